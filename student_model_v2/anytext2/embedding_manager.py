"""Per-line text embeddings that replace the ``*`` tokens of the text caption.

Each line embedding is the sum of four terms (AnyText2's ``enable_flag=False`` adds all four for every
line, even with a blank font hint or the "unspecified" colour):
glyph OCR features of the rendered line, a position-mask encoding, style OCR features of the font-hint
crop, and a colour projection of the RGB value on the 0-255 scale (500 = unspecified).

The OCR inputs are built on the model's (glyph lines) and the font hint's (style crops) device, batched
per shape group; the only device-to-host read is the one stacked copy of the position masks that the
OpenCV min-area box needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .ocr import RecModel
from .ocr_preprocess import (
    batched_by_shape,
    plan_crop,
    positions_to_masks,
    prepare_recognizer_batch,
    prepare_recognizer_inputs,
    units_to_recognizer_images,
    warp_crops,
)

TOKEN_DIM = 768
OCR_FEATURES = 40 * 64


class EncodeNet(nn.Module):
    """Position encoder: five SiLU convs (four stride 2), global average pool -> ``[N, 768]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv_list = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1) for c_in, c_out in ((16, 32), (32, 64), (64, 128), (128, 256))
        )
        self.conv2 = nn.Conv2d(256, out_channels, 3, padding=1)
        self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        for conv in self.conv_list:
            x = self.act(conv(x))
        x = self.act(self.conv2(x))
        return self.pool(x).flatten(1)


def _projection(in_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, TOKEN_DIM), nn.LayerNorm(TOKEN_DIM))


@dataclass
class LineEmbeddings:
    """Line embeddings of one batch plus the pieces they are made of (sample-major, line-minor rows)."""

    per_sample: list[torch.Tensor]
    glyph: torch.Tensor
    position: torch.Tensor
    style: torch.Tensor
    color: torch.Tensor
    glyph_ocr_input: torch.Tensor
    glyph_neck: torch.Tensor
    style_ocr_input: torch.Tensor
    style_neck: torch.Tensor
    style_crops: list[torch.Tensor]


def style_crops(font_hint: torch.Tensor, positions: Sequence[torch.Tensor], n_lines: Sequence[int]) -> list[torch.Tensor]:
    """Crop each line's region out of the font hint (0..1, 1 or 3 channels) as 0..255 CHW, sample-major.

    The crops stay on the font hint's device: the position masks go to the host in one stacked copy for
    the min-area boxes, then one batched warp runs per output size. A line whose box is under one pixel
    thick (a tiny polygon at low resolution) gives an empty crop, on which the original crashes; it
    becomes a blank crop, i.e. "no font hint" for that line.
    """
    order = [(i, j) for i, count in enumerate(n_lines) for j in range(count)]
    sources = units_to_recognizer_images(font_hint.float())
    masks = positions_to_masks(torch.stack([positions[j][i] for i, j in order]).float())
    plans = [plan_crop(mask[:, :, 0]) for mask in masks]
    crops: dict[int, torch.Tensor] = {}
    groups: dict[tuple[int, int], list[int]] = {}
    for k, plan in enumerate(plans):
        if min(plan.out_height, plan.out_width) == 0:
            crops[k] = sources.new_zeros(3, max(1, plan.out_height), max(1, plan.out_width))
        else:
            groups.setdefault((plan.out_height, plan.out_width), []).append(k)
    for indices in groups.values():
        samples = torch.tensor([order[k][0] for k in indices], device=sources.device)
        warped = warp_crops(sources.index_select(0, samples), [plans[k] for k in indices])
        crops.update(zip(indices, warped.unbind(0)))
    return [crops[k] for k in range(len(order))]


class EmbeddingManager(nn.Module):
    """``embedding_manager``: position encoder, style OCR copy and the three projections."""

    def __init__(self, position_channels: int = 1) -> None:
        super().__init__()
        self.position_encoder = EncodeNet(position_channels, TOKEN_DIM)
        self.font_predictor = RecModel()
        self.style_proj = _projection(OCR_FEATURES)
        self.color_proj = _projection(3)
        self.proj = _projection(OCR_FEATURES)

    def forward(
        self,
        text_predictor: RecModel,
        gly_line: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor],
        font_hint: torch.Tensor,
        colors: Sequence[torch.Tensor],
        n_lines: Sequence[int],
        mimic_images: Sequence[Sequence[torch.Tensor] | None] | None = None,
    ) -> LineEmbeddings:
        """Embed every line ``j < n_lines[i]`` of every sample ``i``.

        ``text_predictor`` is the model's glyph OCR (a separate, separately trained copy from the style
        OCR held here). ``mimic_images[i][j]`` (CHW, 0..255) replaces the font-hint crop of that line.
        """
        dtype = self.proj[0].weight.dtype
        device = self.proj[0].weight.device
        order = [(i, j) for i, count in enumerate(n_lines) for j in range(count)]
        if not order:
            raise ValueError("a batch needs at least one text line per sample to build line embeddings")
        glyph_input = batched_by_shape(
            [gly_line[j][i].reshape(gly_line[j].shape[-3:]) for i, j in order],
            lambda lines: prepare_recognizer_batch(units_to_recognizer_images(lines.to(device, torch.float32))),
        ).to(dtype)
        crops = style_crops(font_hint, positions, n_lines)
        if mimic_images is not None:
            crops = [
                mimic_images[i][j].to(crop.device, torch.float32)
                if mimic_images[i] is not None and mimic_images[i][j] is not None else crop
                for crop, (i, j) in zip(crops, order)
            ]
        style_input = prepare_recognizer_inputs(crops).to(device, dtype)
        glyph_neck = text_predictor(glyph_input)
        style_neck = self.font_predictor(style_input)
        glyph_term = self.proj(glyph_neck.flatten(1))
        style_term = self.style_proj(style_neck.flatten(1))
        position_masks = torch.stack([positions[j][i] for i, j in order]).to(device, dtype)
        position_term = self.position_encoder(position_masks)
        rgb = torch.stack([colors[j][i] for i, j in order]).to(device, dtype) * 255.0
        color_term = self.color_proj(rgb)
        total = glyph_term + position_term + style_term + color_term
        return LineEmbeddings(
            per_sample=list(total.split(list(n_lines))),
            glyph=glyph_term,
            position=position_term,
            style=style_term,
            color=color_term,
            glyph_ocr_input=glyph_input,
            glyph_neck=glyph_neck,
            style_ocr_input=style_input,
            style_neck=style_neck,
            style_crops=crops,
        )
