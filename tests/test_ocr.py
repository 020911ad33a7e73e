"""OCR recogniser, its pre-processing and the style crop against golden case tiny_a."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from student_model_v2.anytext2.init_rule import apply_init_rule
from student_model_v2.anytext2.ocr import (
    CTC_CLASSES,
    RecModel,
    crop_image,
    position_to_mask,
    prepare_recognizer_inputs,
    unit_to_recognizer_image,
)
from student_model_v2.anytext2.ocr_preprocess import (
    REC_HEIGHT,
    REC_WIDTH,
    min_area_box,
    rotate_if_tall,
    similarity_transform,
)

GOLDEN = Path(__file__).parent / "data" / "golden" / "tiny_a"
PREFIXES = ("text_predictor.", "embedding_manager.font_predictor.")


def assert_golden(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != golden {tuple(ref.shape)}"
    limit = 1e-3 * max(1e-6, ref.abs().max().item())
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= limit, f"{name}: max|ours-ref| = {err:.3e} > {limit:.3e}"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "tensors.safetensors"))


@pytest.fixture(scope="module")
def case() -> dict:
    return json.loads((GOLDEN / "case.json").read_text())


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict]:
    return json.loads((GOLDEN / "state_dict_manifest.json").read_text())["keys"]


@pytest.fixture(scope="module")
def recognizers() -> dict[str, RecModel]:
    models = {}
    for prefix in PREFIXES:
        model = RecModel().eval()
        apply_init_rule(model, prefix=prefix)
        models[prefix] = model
    return models


def line_order(case: dict) -> list[tuple[int, int]]:
    """(sample, line) pairs in the embedding manager's order: sample-major, then line."""
    return [(i, j) for i, n_lines in enumerate(case["n_lines"]) for j in range(n_lines)]


def style_crops(golden: dict[str, torch.Tensor], case: dict) -> list[torch.Tensor]:
    crops = []
    for i, j in line_order(case):
        font_hint = golden["in.font_hint"][i].repeat(3, 1, 1) * 255
        crops.append(crop_image(font_hint, position_to_mask(golden[f"in.positions.{j}"][i])))
    return crops


@pytest.mark.parametrize("prefix", PREFIXES)
def test_state_dict_matches_manifest(prefix: str, manifest: dict, recognizers: dict) -> None:
    state = recognizers[prefix].state_dict()
    expected = {key[len(prefix):]: meta for key, meta in manifest.items() if key.startswith(prefix)}
    assert len(expected) == 228
    assert sorted(state) == sorted(expected)
    for key, tensor in state.items():
        meta = expected[key]
        assert list(tensor.shape) == meta["shape"], f"{prefix}{key}: shape {list(tensor.shape)} != {meta['shape']}"
        assert str(tensor.dtype).removeprefix("torch.") == meta["dtype"], f"{prefix}{key}: dtype {tensor.dtype}"
        digest = hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]
        assert digest == meta["sha256_16"], f"{prefix}{key}: sha256 {digest} != {meta['sha256_16']}"


def test_parameter_count_and_output_shapes(recognizers: dict) -> None:
    model = recognizers["text_predictor."]
    assert sum(p.numel() for p in model.parameters()) == 2_639_665
    with torch.no_grad():
        logits, neck = model.forward_ctc(torch.zeros(2, 3, REC_HEIGHT, REC_WIDTH))
        plain = model(torch.zeros(2, 3, REC_HEIGHT, REC_WIDTH))
    assert logits.shape == (2, 40, CTC_CLASSES)
    assert neck.shape == (2, 40, 64)
    torch.testing.assert_close(plain, neck, rtol=0, atol=0)
    torch.testing.assert_close(logits, model.head.fc(neck), rtol=0, atol=0)


def test_gly_line_input_and_neck(golden: dict, case: dict, recognizers: dict) -> None:
    lines = [unit_to_recognizer_image(golden[f"in.gly_line.{j}"][i]) for i, j in line_order(case)]
    batch = prepare_recognizer_inputs(lines)
    assert_golden("out.ocr.gly_line_input", batch, golden["out.ocr.gly_line_input"])
    # 80x512 -> 48x308, the remaining 12 columns are the post-normalisation zero pad.
    assert torch.count_nonzero(batch[..., 308:]) == 0
    with torch.no_grad():
        neck = recognizers["text_predictor."](batch)
    assert_golden("out.ocr.gly_line_neck", neck, golden["out.ocr.gly_line_neck"])


@pytest.mark.parametrize(("sample", "line"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_style_crop(sample: int, line: int, golden: dict) -> None:
    font_hint = golden["in.font_hint"][sample].repeat(3, 1, 1) * 255
    mask = position_to_mask(golden[f"in.positions.{line}"][sample])
    crop = crop_image(font_hint, mask)
    assert_golden(f"out.style_crop.{sample}.{line}", crop, golden[f"out.style_crop.{sample}.{line}"])


def test_style_input_and_neck(golden: dict, case: dict, recognizers: dict) -> None:
    # The embedding manager divides crops by 255 and the recogniser wrapper multiplies back.
    images = [unit_to_recognizer_image(crop / 255.0) for crop in style_crops(golden, case)]
    batch = prepare_recognizer_inputs(images)
    assert_golden("out.ocr.style_input", batch, golden["out.ocr.style_input"])
    with torch.no_grad():
        neck = recognizers["embedding_manager.font_predictor."](batch)
    assert_golden("out.ocr.style_neck", neck, golden["out.ocr.style_neck"])


def test_tall_images_are_rotated_counter_clockwise() -> None:
    channels, height, width = 3, 50, 20
    image = torch.arange(channels * height * width, dtype=torch.float32).reshape(channels, height, width)
    rotated = rotate_if_tall(image)
    assert rotated.shape == (channels, width, height)
    for row, col in [(0, 0), (3, 7), (width - 1, height - 1)]:
        # Top row of the result is the input's last column, read top to bottom.
        torch.testing.assert_close(rotated[:, row, col], image[:, col, width - 1 - row], rtol=0, atol=0)
    torch.testing.assert_close(rotated, torch.rot90(image, 1, dims=(1, 2)), rtol=0, atol=0)

    batch = prepare_recognizer_inputs([image, rotated.clone()])
    torch.testing.assert_close(batch[0], batch[1], rtol=0, atol=0)
    # Rotated 50 wide x 20 high -> 48 x ceil(48*50/20) = 120 columns of content, then zero pad.
    assert torch.count_nonzero(batch[0, :, :, 120:]) == 0
    assert torch.count_nonzero(batch[0, :, :, :120]) > 0


def test_rotation_threshold_is_strict() -> None:
    at_limit = torch.rand(3, 12, 10)
    assert rotate_if_tall(at_limit) is at_limit
    assert rotate_if_tall(torch.rand(3, 13, 10)).shape == (3, 10, 13)


def test_resize_keeps_aspect_and_caps_width() -> None:
    wide = torch.full((3, 10, 1000), 255.0)
    batch = prepare_recognizer_inputs([wide, torch.zeros(3, 48, 100)])
    assert batch.shape == (2, 3, REC_HEIGHT, REC_WIDTH)
    torch.testing.assert_close(batch[0], torch.ones_like(batch[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[1, :, :, :100], -torch.ones_like(batch[1, :, :, :100]), rtol=0, atol=1e-5)
    assert torch.count_nonzero(batch[1, :, :, 100:]) == 0


def test_similarity_transform_recovers_known_transform() -> None:
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -2.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    src = np.array([[0.0, 0.0], [10.0, 1.0], [9.0, 6.0], [-1.0, 4.0]])
    dst = src @ (scale * rotation).T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:2, :2], scale * rotation, atol=1e-12)
    np.testing.assert_allclose(matrix[:2, 2], shift, atol=1e-12)
    np.testing.assert_allclose(matrix[2], [0.0, 0.0, 1.0])


def test_min_area_box_orders_corners() -> None:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:21, 5:41] = 255
    mask[50:52, 50:52] = 255  # smaller blob must be ignored
    box = min_area_box(mask)
    assert box.tolist() == [[5, 10], [40, 10], [40, 20], [5, 20]]


def test_crop_of_axis_aligned_region_keeps_original_subpixel_shift() -> None:
    # The original normalises pixel coordinates with 2/W (not 2/(W-1)) although the sampling uses
    # align_corners=True, so a pure translation by t lands at t*(W-1)/W. A linear ramp image makes
    # the bilinear result exact and exposes that shift.
    height, width = 40, 60
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    image = torch.stack([2.0 * xs + 1.0 * ys, 1.0 * xs + 3.0 * ys, 0.5 * xs + 0.5 * ys + 10.0])
    mask = np.zeros((height, width, 1), dtype=np.uint8)
    mask[8:20, 10:50] = 255
    crop = crop_image(image, mask)
    assert crop.shape == (3, 11, 39)
    src_x = xs[:11, :39] + 10 * (width - 1) / width
    src_y = ys[:11, :39] + 8 * (height - 1) / height
    expected = torch.stack([2.0 * src_x + 1.0 * src_y, 1.0 * src_x + 3.0 * src_y, 0.5 * src_x + 0.5 * src_y + 10.0])
    torch.testing.assert_close(crop, expected, rtol=0, atol=1e-3)


def test_crop_samples_only_the_box_yet_equals_the_full_image_warp() -> None:
    """The original warps the whole image with affine_grid, then cuts the box; ours samples the box only."""
    import cv2
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 96, 128, generator=generator) * 255
    mask = np.zeros((96, 128), dtype=np.uint8)
    cv2.fillPoly(mask, [np.array([[20, 30], [100, 12], [108, 40], [28, 60]], np.int32)], 255)
    crop = crop_image(image, mask)
    corners = min_area_box(mask).astype(np.float32)
    width = max(np.linalg.norm(corners[0] - corners[1]), np.linalg.norm(corners[2] - corners[3]))
    height = max(np.linalg.norm(corners[0] - corners[3]), np.linalg.norm(corners[1] - corners[2]))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    to_unit = np.array([[2 / 128, 0, -1], [0, 2 / 96, -1], [0, 0, 1]])
    theta = np.linalg.inv(to_unit @ similarity_transform(corners, target) @ np.linalg.inv(to_unit))
    grid = F.affine_grid(torch.from_numpy(theta[:2]).float()[None], [1, 3, 96, 128], align_corners=True)
    full = F.grid_sample(image[None], grid, align_corners=True)[0].clamp(0, 255)
    expected = full[:, : int(height), : int(width)]
    assert crop.shape == expected.shape and min(crop.shape[1:]) > 10
    torch.testing.assert_close(crop, expected, rtol=0, atol=1e-3)


def test_crop_of_empty_mask_uses_fallback_box() -> None:
    image = torch.rand(3, 128, 128) * 255
    crop = crop_image(image, np.zeros((128, 128, 1), dtype=np.uint8))
    assert crop.shape == (3, 100, 100)
    torch.testing.assert_close(crop, image[:, :100, :100], rtol=0, atol=1e-2)


def test_position_to_mask_and_input_validation() -> None:
    mask = position_to_mask(torch.tensor([[[0.0, 1.0], [0.6, 1.0]]]))
    assert mask.dtype == np.uint8 and mask.shape == (2, 2, 1)
    assert mask[:, :, 0].tolist() == [[0, 255], [0, 255]]
    with pytest.raises(TypeError, match="uint8"):
        crop_image(torch.zeros(3, 2, 2), np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="does not match"):
        crop_image(torch.zeros(3, 4, 4), np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="image 1"):
        prepare_recognizer_inputs([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)])


def test_unit_to_recognizer_image_repeats_single_channel() -> None:
    line = torch.zeros(1, 1, 80, 512)
    line[0, 0, 10, 20] = 1.0
    image = unit_to_recognizer_image(line)
    assert image.shape == (3, 80, 512)
    assert torch.all(image[:, 10, 20] == 255.0) and image.sum() == 3 * 255.0
    colour = torch.rand(3, 5, 7)
    torch.testing.assert_close(unit_to_recognizer_image(colour), colour * 255, rtol=0, atol=0)
