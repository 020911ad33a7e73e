"""Recogniser input preparation and the font-hint style crop, matching AnyText2's numerics.

Everything here works on CHW tensors on the 0..255 scale, the convention of the original
``TextRecognizer``. Two details change results noticeably and are easy to get wrong:

* the aspect-preserving resize uses ``align_corners=True`` and the zero padding to width 320 is
  applied *after* normalisation to [-1, 1], so the pad reads as mid-grey, not black;
* crops taller than 1.2x their width are rotated by 90 degrees before resizing.

The original sorts images by aspect ratio and runs them in batches of 6; in eval mode every sample
is processed independently, so one batch in input order gives the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def resize_normalize_pad(image: torch.Tensor) -> torch.Tensor:
    """Resize a CHW 0..255 image to 48 x w', map to [-1, 1], then zero-pad on the right to 320."""
    channels, height, width = image.shape
    new_width = resized_width(height, width)
    resized = F.interpolate(image.unsqueeze(0), size=(REC_HEIGHT, new_width), mode="bilinear", align_corners=True)
    resized = (resized / 255.0 - 0.5) / 0.5
    padded = image.new_zeros((channels, REC_HEIGHT, REC_WIDTH))
    padded[:, :, :new_width] = resized[0]
    return padded


def prepare_recognizer_inputs(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack CHW 3-channel 0..255 images into the normalised, padded batch ``[N, 3, 48, 320]``."""
    if len(images) == 0:
        raise ValueError("prepare_recognizer_inputs needs at least one image")
    batch = []
    for index, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) == 0:
            raise ValueError(f"recogniser image {index} must be a non-empty [3,H,W] tensor, got {tuple(image.shape)}")
        batch.append(resize_normalize_pad(rotate_if_tall(image)))
    return torch.stack(batch, dim=0)


def position_to_mask(position: torch.Tensor) -> np.ndarray:
    """Convert a ``[1,H,W]`` position map to the ``HxWx1`` uint8 mask :func:`crop_image` expects.

    The cast to uint8 happens *before* the x255, as in the original: only values >= 1 survive, so a
    soft (anti-aliased) mask would lose its partial pixels rather than be rounded.
    """
    if position.dim() != 3 or position.shape[0] != 1:
        raise ValueError(f"expected a [1,H,W] position map, got shape {tuple(position.shape)}")
    return position.permute(1, 2, 0).detach().cpu().numpy().astype(np.uint8) * 255


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


def _warp(image: torch.Tensor, matrix: np.ndarray, out_height: int, out_width: int) -> torch.Tensor:
    """Apply the pixel-space affine ``matrix`` (source -> output) and keep output rows/cols from 0.

    The original warps the whole image with ``affine_grid`` over its full size and then cuts the box
    out; sampling only the box's grid points gives the same values at a fraction of the cost. The
    normalised coordinates are those ``affine_grid(align_corners=True)`` builds for the full size.
    """
    channels, height, width = image.shape
    to_unit = np.array([[2 / width, 0, -1], [0, 2 / height, -1], [0, 0, 1]])
    theta = np.linalg.inv(to_unit @ matrix @ np.linalg.inv(to_unit))
    theta_t = torch.from_numpy(theta[:2, :]).to(dtype=torch.float32, device=image.device)
    xs = torch.linspace(-1, 1, width, device=image.device)[:out_width]
    ys = torch.linspace(-1, 1, height, device=image.device)[:out_height]
    base = torch.stack([xs.expand(out_height, -1), ys[:, None].expand(-1, out_width),
                        torch.ones(out_height, out_width, device=image.device)], dim=-1)
    grid = (base.reshape(-1, 3) @ theta_t.T).reshape(1, out_height, out_width, 2)
    warped = F.grid_sample(image.unsqueeze(0), grid.to(image.dtype), align_corners=True)
    return warped.squeeze(0)


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
    corners = min_area_box(np.ascontiguousarray(mask)).astype(np.float32)
    width = max(np.linalg.norm(corners[0] - corners[1]), np.linalg.norm(corners[2] - corners[3]))
    height = max(np.linalg.norm(corners[0] - corners[3]), np.linalg.norm(corners[1] - corners[2]))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    out_height, out_width = min(int(height), src.shape[1]), min(int(width), src.shape[2])
    return _warp(src, similarity_transform(corners, target), out_height, out_width).clamp(0, 255)
