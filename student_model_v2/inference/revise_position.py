"""AnyText2's "Revise Position": fit each line's position mask to the glyphs drawn in it.

A hand-drawn position is usually larger or more ragged than the text that fits in it; AnyText2 replaces
the line's mask by the minimum-area rectangle around its rendered glyphs (closed with a kernel of a
tenth of the image size, so letters merge into one blob), and keeps the drawing when the glyphs do not
form exactly one blob. Only the per-line ``positions`` change: the glyphs, their polygons and the
repaint hint stay as drawn, as upstream (``ms_wrapper.py``, generation mode only). Unlike upstream the
kernel sides are made odd: OpenCV's closing with an even kernel moves the result by a pixel, and the
rectangle would then miss the glyphs' first row and column.

``TextRequest(revise_position=True)`` applies it in the pipeline's ``build_conditioning``, so the CLI
(``--revise_position``) and the demo share it.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def revised_line_mask(ink: np.ndarray) -> np.ndarray | None:
    """The revised (H, W) float32 mask of one line from its glyph render (> 0 = ink), or None when the
    closed glyphs are not a single blob."""
    height, width = ink.shape
    kernel = np.ones((height // 10 | 1, width // 10 | 1), np.uint8)  # odd sides: an even kernel shifts the closing
    closed = cv2.morphologyEx(np.where(ink > 0, 255, 0).astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if len(contours) != 1:
        return None
    box = cv2.boxPoints(cv2.minAreaRect(contours[0])).astype(np.int32)
    cv2.drawContours(closed, [box], -1, 255, -1)
    return closed.astype(np.float32) / 255.0


def revise_line_masks(glyphs: list[torch.Tensor], positions: list[torch.Tensor],
                      texts: list[str]) -> tuple[list[torch.Tensor], list[str]]:
    """Each text line's position (``[1, 1, H, W]``) fitted to its glyphs (``[1, 3, H, W]``); returns the
    new positions and warnings for the lines kept as drawn."""
    revised, warnings = [], []
    for index, (glyph, position) in enumerate(zip(glyphs, positions)):
        ink = glyph[0].amax(dim=0).numpy()
        mask = revised_line_mask(ink) if ink.any() else None
        if mask is None:
            if ink.any():
                warnings.append(f'could not revise position {index + 1} ("{texts[index]}"): its glyphs do not '
                                "form one block, so the drawn position is kept")
            revised.append(position)
            continue
        revised.append(torch.from_numpy(mask)[None, None].to(position.dtype))
    return revised, warnings
