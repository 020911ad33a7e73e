"""Batched, device-side OCR conditioning against the per-line path it replaced (issue 14).

The reference below is the former per-line implementation, kept here only as the oracle: each glyph
line and each style crop went through the host one at a time (``.cpu()`` per line). The batched path
must give the same tensors bit for bit on the CPU, and read the device back O(1) times per call.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student_model_v2.anytext2.embedding_manager import EmbeddingManager, style_crops
from student_model_v2.anytext2.ocr import RecModel
from student_model_v2.anytext2.ocr_preprocess import (
    REC_HEIGHT,
    REC_WIDTH,
    min_area_box,
    prepare_recognizer_inputs,
    resized_width,
    rotate_if_tall,
    similarity_transform,
    unit_to_recognizer_image,
)

HEIGHT, WIDTH = 96, 128


# ---- reference: the per-line implementation before batching -------------------------------------
def _ref_resize_normalize_pad(image: torch.Tensor) -> torch.Tensor:
    channels, height, width = image.shape
    new_width = resized_width(height, width)
    resized = F.interpolate(image.unsqueeze(0), size=(REC_HEIGHT, new_width), mode="bilinear", align_corners=True)
    resized = (resized / 255.0 - 0.5) / 0.5
    padded = image.new_zeros((channels, REC_HEIGHT, REC_WIDTH))
    padded[:, :, :new_width] = resized[0]
    return padded


def _ref_prepare(images: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([_ref_resize_normalize_pad(rotate_if_tall(image)) for image in images], dim=0)


def _ref_position_to_mask(position: torch.Tensor) -> np.ndarray:
    return position.permute(1, 2, 0).detach().cpu().numpy().astype(np.uint8) * 255


def _ref_warp(image: torch.Tensor, matrix: np.ndarray, out_height: int, out_width: int) -> torch.Tensor:
    channels, height, width = image.shape
    to_unit = np.array([[2 / width, 0, -1], [0, 2 / height, -1], [0, 0, 1]])
    theta = np.linalg.inv(to_unit @ matrix @ np.linalg.inv(to_unit))
    theta_t = torch.from_numpy(theta[:2, :]).to(dtype=torch.float32, device=image.device)
    xs = torch.linspace(-1, 1, width, device=image.device)[:out_width]
    ys = torch.linspace(-1, 1, height, device=image.device)[:out_height]
    base = torch.stack([xs.expand(out_height, -1), ys[:, None].expand(-1, out_width),
                        torch.ones(out_height, out_width, device=image.device)], dim=-1)
    grid = (base.reshape(-1, 3) @ theta_t.T).reshape(1, out_height, out_width, 2)
    return F.grid_sample(image.unsqueeze(0), grid.to(image.dtype), align_corners=True).squeeze(0)


def _ref_crop_image(src: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    mask = mask[:, :, 0]
    corners = min_area_box(np.ascontiguousarray(mask)).astype(np.float32)
    width = max(np.linalg.norm(corners[0] - corners[1]), np.linalg.norm(corners[2] - corners[3]))
    height = max(np.linalg.norm(corners[0] - corners[3]), np.linalg.norm(corners[1] - corners[2]))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    out_height, out_width = min(int(height), src.shape[1]), min(int(width), src.shape[2])
    return _ref_warp(src, similarity_transform(corners, target), out_height, out_width).clamp(0, 255)


def _ref_style_crops(font_hint, positions, n_lines) -> list[torch.Tensor]:
    crops = []
    for i, count in enumerate(n_lines):
        source = unit_to_recognizer_image(font_hint[i].float().cpu())
        for j in range(count):
            crop = _ref_crop_image(source, _ref_position_to_mask(positions[j][i].float()))
            if min(crop.shape[1:]) == 0:
                crop = crop.new_zeros(3, max(1, crop.shape[1]), max(1, crop.shape[2]))
            crops.append(crop)
    return crops


def _ref_ocr_inputs(gly_line, positions, font_hint, n_lines, mimic_images):
    order = [(i, j) for i, count in enumerate(n_lines) for j in range(count)]
    lines = [gly_line[j][i].float() for i, j in order]
    glyph_input = _ref_prepare([unit_to_recognizer_image(line.cpu()) for line in lines])
    crops = _ref_style_crops(font_hint, positions, n_lines)
    if mimic_images is not None:
        crops = [mimic_images[i][j].float() if mimic_images[i] is not None and mimic_images[i][j] is not None else crop
                 for crop, (i, j) in zip(crops, order)]
    return glyph_input, crops, _ref_prepare(crops)


# ---- the batch: lines of several sizes, rotated and tall lines, sub-pixel and empty boxes ----------
def _mask(polygon: list[tuple[int, int]] | None) -> torch.Tensor:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    if polygon is not None:
        cv2.fillPoly(mask, [np.array(polygon, dtype=np.int32)], 1)
    return torch.from_numpy(mask).float()[None]


# POLYGONS[j][i]: line j of sample i (None = no foreground: the original's 100x100 fallback box).
POLYGONS = [
    [[(10, 10), (90, 10), (90, 30), (10, 30)],          # wide, 80x20
     [(30, 50), (110, 50), (110, 70), (30, 70)],        # same size elsewhere: batched with the one above
     [(5, 20), (120, 28), (118, 50), (3, 42)]],         # rotated
    [[(20, 40), (100, 15), (106, 34), (26, 59)],        # rotated
     [(60, 5), (60, 5), (60, 5), (60, 5)],              # one pixel: sub-pixel box -> blank crop
     [(100, 10), (120, 10), (120, 90), (100, 90)]],     # tall: rotated for the recogniser
    [[(4, 70), (60, 70), (60, 70), (4, 70)],            # one pixel thick
     None,                                              # empty mask: fallback box
     [(40, 10), (60, 10), (60, 85), (40, 85)]],         # tall
]
N_LINES = [3, 3, 2]


def _batch(font_channels: int = 1):
    generator = torch.Generator().manual_seed(5)
    batch = len(N_LINES)
    positions = [torch.stack([_mask(POLYGONS[j][i]) for i in range(batch)]) for j in range(3)]
    # Line 2's rendering differs in shape from lines 0-1: two shape groups in one call.
    gly_line = [(torch.rand(batch, 1, *shape, generator=generator) > 0.8).float()
                for shape in ((80, 512), (80, 512), (40, 300))]
    font_hint = (torch.rand(batch, font_channels, HEIGHT, WIDTH, generator=generator) > 0.6).float()
    colors = [torch.rand(batch, 3, generator=generator) for _ in range(3)]
    return gly_line, positions, font_hint, colors


@pytest.fixture(scope="module")
def models() -> tuple[EmbeddingManager, RecModel]:
    torch.manual_seed(0)
    return EmbeddingManager().eval(), RecModel().eval()


def _mimics() -> list[list[torch.Tensor | None] | None]:
    generator = torch.Generator().manual_seed(9)
    return [None, [torch.rand(3, 20, 50, generator=generator) * 255, None, None],
            [None, torch.rand(3, 60, 20, generator=generator) * 255]]


@pytest.mark.parametrize("with_mimics", [False, True])
def test_batched_conditioning_equals_the_per_line_path_bit_for_bit(models, with_mimics: bool) -> None:
    manager, text_predictor = models
    gly_line, positions, font_hint, colors = _batch()
    mimics = _mimics() if with_mimics else None
    with torch.no_grad():
        ours = manager(text_predictor, gly_line, positions, font_hint, colors, N_LINES, mimics)
    glyph_ref, crops_ref, style_ref = _ref_ocr_inputs(gly_line, positions, font_hint, N_LINES, mimics)
    assert [tuple(c.shape) for c in ours.style_crops] == [tuple(c.shape) for c in crops_ref]
    # The batch exercises what it claims: a blank (sub-pixel) crop, the fallback box, a tall crop, and
    # output sizes shared by several lines (one batched warp for them).
    shapes = [tuple(c.shape[1:]) for c in _ref_style_crops(font_hint, positions, N_LINES)]
    assert (1, 1) in shapes or any(min(s) == 1 for s in shapes)
    assert (HEIGHT, 100) in shapes and any(h > 1.2 * w for h, w in shapes)
    assert len(set(shapes)) < len(shapes)
    for k, (crop, ref) in enumerate(zip(ours.style_crops, crops_ref)):
        assert torch.equal(crop, ref), f"style crop {k}: max diff {(crop - ref).abs().max():.3e}"
    assert torch.equal(ours.glyph_ocr_input, glyph_ref)
    assert torch.equal(ours.style_ocr_input, style_ref)
    with torch.no_grad():
        neck = manager.font_predictor(style_ref)
    assert torch.equal(ours.style_neck, neck)


def test_batched_crops_of_a_three_channel_font_hint_equal_the_per_line_path() -> None:
    _, positions, font_hint, _ = _batch(font_channels=3)
    ours = style_crops(font_hint, positions, N_LINES)
    reference = _ref_style_crops(font_hint, positions, N_LINES)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))


def test_prepare_recognizer_inputs_groups_shapes_in_input_order() -> None:
    generator = torch.Generator().manual_seed(1)
    sizes = [(80, 512), (30, 10), (80, 512), (5, 700), (30, 10), (48, 100)]
    images = [torch.rand(3, h, w, generator=generator) * 255 for h, w in sizes]
    assert torch.equal(prepare_recognizer_inputs(images), _ref_prepare(images))


class _HostReads:
    """Counts tensor-to-host reads by patching the Tensor methods that make them."""

    METHODS = ("cpu", "item", "tolist", "numpy", "__bool__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts = dict.fromkeys(self.METHODS, 0)
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self.counts[_name] += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def total(self) -> int:
        return sum(self.counts.values())


def test_forward_reads_the_host_twice_whatever_the_line_count(models, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``.cpu()`` and one ``.numpy()`` of the stacked position masks per call, for 1 line or 8;
    the former per-line path makes reads in proportion to the lines (and this test fails on it)."""
    manager, text_predictor = models
    gly_line, positions, font_hint, colors = _batch()
    single = ([g[:1] for g in gly_line], [p[:1] for p in positions], font_hint[:1], [c[:1] for c in colors], [1])
    reads = _HostReads(monkeypatch)
    with torch.no_grad():
        manager(text_predictor, *single)
        one_line = dict(reads.counts)
        reads.counts = dict.fromkeys(reads.METHODS, 0)
        manager(text_predictor, gly_line, positions, font_hint, colors, N_LINES, _mimics())
        eight_lines = dict(reads.counts)
        reads.counts = dict.fromkeys(reads.METHODS, 0)
        _ref_ocr_inputs(gly_line, positions, font_hint, N_LINES, _mimics())
        reference = reads.total()
    expected = {"cpu": 1, "item": 0, "tolist": 0, "numpy": 1, "__bool__": 0}
    assert one_line == expected
    assert eight_lines == expected
    assert reference > 2 * sum(N_LINES)
