"""Read the text lines of an image: cut each line out with its polygon, recognise it with PP-OCRv4.

Recognition only (``rapidocr_onnxruntime``'s ``ch_PP-OCRv4_rec_infer.onnx``, shipped in the wheel): the
line positions are known, so a detector would only add its own misses. The crop is AnyText2's
evaluation crop (``ocr_preprocess.crop_image`` on the polygon's mask: the min-area rectangle, deskewed,
then turned 90 degrees counter-clockwise when taller than 1.2x its width), so rotated and vertical
lines reach the recogniser upright. Resizing and padding to 48 x 320 are the recogniser's own.

The recogniser can only output the characters of its dictionary (``ppocr_keys_v1.txt`` plus the
space, read from the model file): a ground-truth character outside :attr:`LineReader.characters` can
never be read back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..anytext2.ocr_preprocess import crop_image, rotate_if_tall
from ..data.glyph_render import fill_polygon

REC_MODEL_NAME = "ch_PP-OCRv4_rec_infer.onnx"


def load_recognizer(threads: int = 1):
    """rapidocr's PP-OCRv4 ``TextRecognizer`` on the CPU with ``threads`` ONNX Runtime threads.

    ``threads <= 0`` leaves ONNX Runtime's default (all cores). Raises RuntimeError when
    ``rapidocr_onnxruntime`` is not installed.
    """
    try:
        import rapidocr_onnxruntime
        from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer
        from rapidocr_onnxruntime.utils import read_yaml
    except ImportError as exc:
        raise RuntimeError("OCR evaluation needs rapidocr_onnxruntime (pinned in requirements.txt): "
                           f"pip install -r requirements.txt ({exc})") from exc
    root = Path(rapidocr_onnxruntime.__file__).parent
    config = read_yaml(str(root / "config.yaml"))["Rec"]
    config["model_path"] = str(root / config["model_path"])
    count = int(threads) if threads and threads > 0 else -1
    config["intra_op_num_threads"] = count
    config["inter_op_num_threads"] = count
    return TextRecognizer(config)


def crop_line(image: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """The line inside ``polygon`` (pixels of ``image``), upright, as (h, w, 3) uint8 in ``image``'s channels.

    ``image`` is (H, W, 3) uint8. An empty crop (a polygon thinner than a pixel, or one that covers no
    pixel of the image) comes back with a zero dimension, so it reads as nothing; ``crop_image`` would
    instead cut its fallback box out of the image's corner and score whatever is drawn there.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"crop_line needs an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    mask = fill_polygon(polygon, height, width).to_canvas(height, width) * np.uint8(255)
    if not mask.any():
        return np.zeros((0, 0, 3), np.uint8)
    source = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
    crop = rotate_if_tall(crop_image(source, mask))
    return crop.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


class LineReader:
    """Crops lines out of RGB images and reads them; one recogniser session per instance."""

    def __init__(self, threads: int = 1) -> None:
        self._recognizer = load_recognizer(threads)
        self.characters = frozenset(self._recognizer.postprocess_op.character[1:])

    def read(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """(text, confidence) per RGB crop, in order; an empty crop reads as ``("", 0.0)``."""
        readable = [i for i, crop in enumerate(crops) if crop.shape[0] > 0 and crop.shape[1] > 0]
        out: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        if readable:
            # PP-OCR models are trained on OpenCV's BGR images.
            results, _ = self._recognizer([np.ascontiguousarray(crops[i][..., ::-1]) for i in readable])
            for i, (text, score) in zip(readable, results):
                out[i] = (str(text), float(score))
        return out

    def read_lines(self, image: np.ndarray, polygons: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """Read every polygon of one RGB image."""
        return self.read([crop_line(image, polygon) for polygon in polygons])
