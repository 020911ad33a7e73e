"""Recogniser input preparation and the font-hint style crop, matching AnyText2's numerics.

Everything here works on CHW tensors on the 0..255 scale, the convention of the original
``TextRecognizer``. Two details change results noticeably and are easy to get wrong:

* the aspect-preserving resize uses ``align_corners=True`` and the zero padding to width 320 is
  applied *after* normalisation to [-1, 1], so the pad reads as mid-grey, not black;
* crops taller than 1.2x their width are rotated by 90 degrees before resizing.

The original sorts images by aspect ratio and runs them in batches of 6; in eval mode every sample
is processed independently, so one batch in input order gives the same numbers.

The per-pixel work (rescale, rotate, resize, normalise, pad, and the crop's warp) runs batched, one
call per group of equal-shaped images, on the images' own device; shapes are host-side metadata, so
grouping never reads a tensor back. Every op involved treats batch rows independently, so on the CPU
the batched results equal the one-image-at-a-time results bit for bit (tests/test_conditioning_batched.py).
On a CUDA device the same ops run as CUDA kernels, whose float32 bilinear sampling may differ from the
CPU's in the last bits (not measured here: no GPU in the tests).
Only the min-area box needs the host (OpenCV), and it reads the position masks, never the images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

REC_HEIGHT = 48
REC_WIDTH = 320
ROTATE_RATIO = 1.2

# Used when a mask has no foreground at all (the original does the same, with a printed warning).
_FALLBACK_BOX = np.array([[0, 0], [100, 0], [100, 100], [0, 100]], dtype=np.int64)


def unit_to_recognizer_image(image: torch.Tensor) -> torch.Tensor:
    """Turn a ``[C,H,W]`` or ``[1,C,H,W]`` image in 0..1 into the recogniser's 3-channel 0..255 form.

    A 1-channel image (the rendered ``gly_line``) is repeated to 3 channels; 3-channel images (style
    crops divided by 255 upstream) are only rescaled, which is how the original handles both paths.
    """
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected a single image [1,C,H,W], got shape {tuple(image.shape)}")
        image = image[0]
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a [C,H,W] image with C in (1, 3), got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.repeat(3, 1, 1)
    return image * 255


def units_to_recognizer_images(batch: torch.Tensor) -> torch.Tensor:
    """Batched :func:`unit_to_recognizer_image`: ``[N,C,H,W]`` in 0..1, C in (1, 3) -> ``[N,3,H,W]`` 0..255."""
    if batch.dim() != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"expected a [N,C,H,W] batch with C in (1, 3), got shape {tuple(batch.shape)}")
    if batch.shape[1] == 1:
        batch = batch.repeat(1, 3, 1, 1)
    return batch * 255


def rotate_if_tall(image: torch.Tensor) -> torch.Tensor:
    """Rotate a CHW image 90 degrees counter-clockwise when ``h > 1.2 w`` so vertical text reads sideways.

    Equivalent to swapping the H and W axes and flipping the new height axis.
    """
    height, width = image.shape[1:]
    if height > width * ROTATE_RATIO:
        return image.transpose(1, 2).flip(dims=[1])
    return image


def resized_width(height: int, width: int) -> int:
    """Width after scaling to height 48 with the aspect kept, capped at 320 (the original's rounding)."""
    target = math.ceil(REC_HEIGHT * (width / float(height)))
    return REC_WIDTH if target > REC_WIDTH else int(target)


def prepare_recognizer_batch(batch: torch.Tensor) -> torch.Tensor:
    """Equal-shaped ``[N,3,H,W]`` 0..255 images -> ``[N,3,48,320]``: rotate if tall, resize to 48 x w'
    (aspect kept), map to [-1, 1], then zero-pad on the right to 320. Runs on ``batch``'s device."""
    height, width = batch.shape[2:]
    if height > width * ROTATE_RATIO:
        batch = batch.transpose(2, 3).flip(dims=[2])
        height, width = width, height
    new_width = resized_width(height, width)
    resized = F.interpolate(batch, size=(REC_HEIGHT, new_width), mode="bilinear", align_corners=True)
    resized = (resized / 255.0 - 0.5) / 0.5
    return F.pad(resized, (0, REC_WIDTH - new_width))


def shape_groups(images: Sequence[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Indices of ``images`` grouped by shape, in first-seen order (shapes are host metadata: no sync)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    return groups


def batched_by_shape(images: Sequence[torch.Tensor], transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Stack each equal-shape group of ``images``, apply ``transform`` once per group, rows in input order.

    ``transform`` maps ``[n, ...]`` to ``[n, *out]`` with the same ``out`` for every group.
    """
    if len(images) == 0:
        raise ValueError("batched_by_shape needs at least one image")
    groups = list(shape_groups(images).values())
    if len(groups) == 1:
        return transform(torch.stack(list(images)))
    results = [(indices, transform(torch.stack([images[k] for k in indices]))) for indices in groups]
    first = results[0][1]
    out = first.new_empty((len(images), *first.shape[1:]))
    for indices, result in results:
        out[torch.tensor(indices, device=out.device)] = result
    return out


def prepare_recognizer_inputs(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack CHW 3-channel 0..255 images (one device) into the normalised, padded batch ``[N, 3, 48, 320]``.

    One :func:`prepare_recognizer_batch` call per distinct image shape.
    """
    if len(images) == 0:
        raise ValueError("prepare_recognizer_inputs needs at least one image")
    for index, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) == 0:
            raise ValueError(f"recogniser image {index} must be a non-empty [3,H,W] tensor, got {tuple(image.shape)}")
    return batched_by_shape(images, prepare_recognizer_batch)


def position_to_mask(position: torch.Tensor) -> np.ndarray:
    """Convert a ``[1,H,W]`` position map to the ``HxWx1`` uint8 mask :func:`crop_image` expects.

    The cast to uint8 happens *before* the x255, as in the original: only values >= 1 survive, so a
    soft (anti-aliased) mask would lose its partial pixels rather than be rounded.
    """
    if position.dim() != 3 or position.shape[0] != 1:
        raise ValueError(f"expected a [1,H,W] position map, got shape {tuple(position.shape)}")
    return positions_to_masks(position.unsqueeze(0))[0]


def positions_to_masks(positions: torch.Tensor) -> np.ndarray:
    """Batched :func:`position_to_mask`: ``[N,1,H,W]`` -> ``[N,H,W,1]`` uint8, in one device-to-host read."""
    if positions.dim() != 4 or positions.shape[1] != 1:
        raise ValueError(f"expected [N,1,H,W] position maps, got shape {tuple(positions.shape)}")
    return positions.permute(0, 2, 3, 1).detach().cpu().numpy().astype(np.uint8) * 255


def min_area_box(mask: np.ndarray) -> np.ndarray:
    """Corners (tl, tr, br, bl) of the min-area rectangle around the largest blob of ``mask`` as int64.

    Corner coordinates are truncated toward zero like the original's ``np.int0``; ties in the x/y sort
    keep OpenCV's corner order (Python's sort is stable), which fixes the crop's orientation.
    """
    _, binary = cv2.threshold(mask, 127, 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) == 0:
        return _FALLBACK_BOX.copy()
    largest = max(contours, key=cv2.contourArea)
    corners = cv2.boxPoints(cv2.minAreaRect(largest)).astype(np.int64)
    by_x = sorted(corners, key=lambda point: point[0])
    top_left, bottom_left = sorted(by_x[:2], key=lambda point: point[1])
    top_right, bottom_right = sorted(by_x[2:], key=lambda point: point[1])
    return np.array([top_left, top_right, bottom_right, bottom_left])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama (1991), Eqs. 38-43, returned as a 3x3 float64 homogeneous matrix. The centring and the SVD
    run in the inputs' dtype (float32 for the crop, as in the original); degenerate point sets follow
    the paper's rank cases and a rank-0 set yields an all-NaN matrix.
    """
    count, dim = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_centred = src - src_mean
    dst_centred = dst - dst_mean
    covariance = dst_centred.T @ src_centred / count
    signs = np.ones(dim, dtype=np.float64)
    if np.linalg.det(covariance) < 0:
        signs[-1] = -1.0
    transform = np.eye(dim + 1, dtype=np.float64)
    u, singular, vt = np.linalg.svd(covariance)
    rank = np.linalg.matrix_rank(covariance)
    if rank == 0:
        return np.full((dim + 1, dim + 1), np.nan)
    if rank == dim - 1:
        # One free direction: pick the proper rotation (det +1) rather than trusting det(covariance).
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rotation = u @ vt
        else:
            rotation_signs = signs.copy()
            rotation_signs[-1] = -1.0
            rotation = u @ np.diag(rotation_signs) @ vt
    else:
        rotation = u @ np.diag(signs) @ vt
    transform[:dim, :dim] = rotation
    # float() keeps NumPy 1.x promotion (scalar reciprocal in float64) under NumPy 2's NEP 50 rules.
    scale = 1.0 / float(src_centred.var(axis=0).sum()) * (singular @ signs)
    transform[:dim, dim] = dst_mean - scale * (transform[:dim, :dim] @ src_mean.T)
    transform[:dim, :dim] *= scale
    return transform


@dataclass(frozen=True)
class CropPlan:
    """Host-side part of a crop: the normalised source->output ``theta`` (2x3) and the output size."""

    theta: np.ndarray
    out_height: int
    out_width: int


def plan_crop(mask: np.ndarray) -> CropPlan:
    """Min-area box of ``mask`` (HxW uint8) and the affine that deskews it onto ``[0, w) x [0, h)``.

    The original warps the whole image with ``affine_grid`` over its full size and then cuts the box
    out; sampling only the box's grid points gives the same values at a fraction of the cost, so
    ``theta`` is expressed in the normalised coordinates ``affine_grid(align_corners=True)`` builds for
    the full source size (that of ``mask``).
    """
    corners = min_area_box(np.ascontiguousarray(mask)).astype(np.float32)
    width = max(np.linalg.norm(corners[0] - corners[1]), np.linalg.norm(corners[2] - corners[3]))
    height = max(np.linalg.norm(corners[0] - corners[3]), np.linalg.norm(corners[1] - corners[2]))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    source_height, source_width = mask.shape
    to_unit = np.array([[2 / source_width, 0, -1], [0, 2 / source_height, -1], [0, 0, 1]])
    theta = np.linalg.inv(to_unit @ similarity_transform(corners, target) @ np.linalg.inv(to_unit))
    return CropPlan(theta[:2, :], min(int(height), source_height), min(int(width), source_width))


def warp_crops(sources: torch.Tensor, plans: Sequence[CropPlan]) -> torch.Tensor:
    """Cut ``plans[n]``'s box out of ``sources[n]`` (``[N,C,H,W]``, 0..255), all plans of one output size.

    One ``grid_sample`` for the batch, on ``sources``' device; the thetas travel host->device in one copy.
    Output rows/cols start at 0 of the full-size grid (see :func:`plan_crop`), clamped to 0..255.
    """
    out_height, out_width = plans[0].out_height, plans[0].out_width
    if any((plan.out_height, plan.out_width) != (out_height, out_width) for plan in plans):
        raise ValueError("warp_crops needs plans of one output size; group them by (out_height, out_width)")
    _, _, height, width = sources.shape
    device = sources.device
    theta = torch.from_numpy(np.stack([plan.theta for plan in plans])).to(dtype=torch.float32, device=device)
    xs = torch.linspace(-1, 1, width, device=device)[:out_width]
    ys = torch.linspace(-1, 1, height, device=device)[:out_height]
    base = torch.stack([xs.expand(out_height, -1), ys[:, None].expand(-1, out_width),
                        torch.ones(out_height, out_width, device=device)], dim=-1)
    grid = (base.reshape(1, -1, 3) @ theta.transpose(1, 2)).reshape(len(plans), out_height, out_width, 2)
    return F.grid_sample(sources, grid.to(sources.dtype), align_corners=True).clamp(0, 255)


def crop_image(src: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Cut the (possibly rotated) text region marked by ``mask`` out of ``src``, deskewed, CHW 0..255.

    ``src`` is CHW on the 0..255 scale; ``mask`` is HxW or HxWx1 uint8 (see :func:`position_to_mask`).
    The largest foreground blob's min-area rectangle is mapped onto an axis-aligned ``w x h`` box at
    the origin by a similarity transform, the whole image is warped, and the box is cut out, so the
    result is ``[C, int(h), int(w)]`` where ``w``/``h`` are the longer opposite-side lengths.
    """
    if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8:
        raise TypeError(f"crop_image mask must be a uint8 numpy array, got {type(mask).__name__} "
                        f"{getattr(mask, 'dtype', '')}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise ValueError(f"crop_image mask must be HxW or HxWx1, got shape {mask.shape}")
    if src.dim() != 3 or tuple(src.shape[1:]) != mask.shape:
        raise ValueError(f"crop_image source {tuple(src.shape)} does not match mask {mask.shape}")
    return warp_crops(src.unsqueeze(0), [plan_crop(mask)])[0]
