"""Auxiliary losses for glyph sharpness: focal frequency loss and a text-masked Sobel gradient loss.

Both work on any (B, C, H, W) tensor — latents (B, 4, h, w) or decoded images (B, 3, H, W) — because text legibility
lives in high frequencies and edges, which an element-wise loss on latents weighs no more than flat background.
They are optional terms next to the consistency loss (original toolkit v2_3, ``docs/original_toolkit.md`` §4.4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

MaskSource = Literal["hint", "positions", "inv_mask"]
Reduction = Literal["mean", "sum", "none"]

_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_SOBEL_Y = ((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0))


def _reduce(loss: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}; expected mean, sum or none")


class FocalFrequencyLoss(nn.Module):
    """Focal frequency loss (Jiang et al., ICCV 2021): a spectrum distance that focuses on the worst frequencies.

    For prediction p and target q, each split into P×P patches (P = ``patch_factor``), with F = FFT2 (orthonormal)
    per sample, patch and channel:

        d(u, v)  = |F_p(u, v) − F_q(u, v)|²
        W(u, v)  = |F_p(u, v) − F_q(u, v)|^α                  (α = ``alpha``)
        W        ← log(1 + W)                                 if ``log_matrix``
        W        ← W / max W                                  max per (sample, patch, channel), or over the whole
                                                              batch if ``batch_matrix``; NaN → 0, clamp to [0, 1]
        FFL      = loss_weight · mean(stopgrad(W) ⊙ d)

    ``ave_spectrum`` averages F over the batch first (compares batch-mean spectra). W is a fixed weight (no gradient)
    so the loss only pushes on d, harder where the error is largest. With α = 0, W ≡ 1 and, by Parseval with the
    orthonormal FFT, FFL equals the MSE.
    """

    def __init__(
        self,
        loss_weight: float = 1.0,
        alpha: float = 1.0,
        patch_factor: int = 1,
        ave_spectrum: bool = False,
        log_matrix: bool = False,
        batch_matrix: bool = False,
    ) -> None:
        super().__init__()
        if patch_factor < 1:
            raise ValueError(f"patch_factor must be >= 1, got {patch_factor}")
        self.loss_weight = float(loss_weight)
        self.alpha = float(alpha)
        self.patch_factor = int(patch_factor)
        self.ave_spectrum = bool(ave_spectrum)
        self.log_matrix = bool(log_matrix)
        self.batch_matrix = bool(batch_matrix)

    def _spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → complex (B, P², C, H/P, W/P) spectra, patches in row-major order."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        p = self.patch_factor
        if h % p or w % p:
            raise ValueError(f"patch_factor {p} must divide the spatial size {h}x{w}")
        patches = x.reshape(b, c, p, h // p, p, w // p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, p * p, c, h // p, w // p)
        return torch.fft.fft2(patches.float(), norm="ortho")

    def _focal_weight(self, diff: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight = diff.abs() ** self.alpha
            if self.log_matrix:
                weight = torch.log1p(weight)
            if self.batch_matrix:
                denom = weight.max()
            else:
                denom = weight.amax(dim=(-2, -1), keepdim=True)
            weight = torch.nan_to_num(weight / denom.clamp(min=1e-8), nan=0.0)
            return weight.clamp(0.0, 1.0)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar FFL between ``pred`` and ``target`` of the same (B, C, H, W) shape (computed in float32)."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred_freq = self._spectrum(pred)
        target_freq = self._spectrum(target)
        if self.ave_spectrum:
            pred_freq = pred_freq.mean(dim=0, keepdim=True)
            target_freq = target_freq.mean(dim=0, keepdim=True)
        diff = pred_freq - target_freq
        distance = diff.real**2 + diff.imag**2
        return self.loss_weight * torch.mean(self._focal_weight(diff) * distance)


def _as_nchw_mask(mask: torch.Tensor, key: str) -> torch.Tensor:
    """Bring a mask in AnyText2 layouts — (B, H, W, 1) collated T3, (B, 1, H, W) channel-first, (B, H, W) — to NCHW."""
    if mask.ndim == 3:
        return mask.unsqueeze(1)
    if mask.ndim == 4 and mask.shape[1] == 1:
        return mask
    if mask.ndim == 4 and mask.shape[-1] == 1:
        return mask.permute(0, 3, 1, 2)
    raise ValueError(
        f"batch[{key!r}] has shape {tuple(mask.shape)}; expected (B, 1, H, W), (B, H, W, 1) or (B, H, W)"
    )


def text_mask_from_batch(
    batch: Mapping[str, object], source: MaskSource, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Float (B, 1, h, w) region mask in [0, 1] from a batch, resized (nearest) to ``size`` = (h, w) if given.

    * ``hint``: union of the selected text lines — the text mask to use.
    * ``positions``: per-line masks (a list), combined by element-wise max — the same region as ``hint``.
    * ``inv_mask``: returns 1 − inv_mask, the region AnyText2's own loss keeps (everything except invalid and
      unselected polygons). It is **not** a text mask: weighting with it boosts almost the whole image (the original
      toolkit's D17). Provided for reproducing that setting only.

    Nearest resizing keeps the mask binary, so "text" and "background" weights stay exactly two values.
    """
    if source not in ("hint", "positions", "inv_mask"):
        raise ValueError(f"unknown mask source {source!r}; expected hint, positions or inv_mask")
    if source not in batch:
        raise KeyError(f"batch has no {source!r} entry to build the loss mask from")
    value = batch[source]
    if source == "positions":
        if not isinstance(value, Sequence) or isinstance(value, torch.Tensor) or len(value) == 0:
            raise ValueError("batch['positions'] must be a non-empty list of per-line masks")
        lines = [_as_nchw_mask(torch.as_tensor(line), f"positions[{i}]").float() for i, line in enumerate(value)]
        mask = torch.stack(lines, dim=0).amax(dim=0)
    else:
        mask = _as_nchw_mask(torch.as_tensor(value), source).float()
        if source == "inv_mask":
            mask = 1.0 - mask
    if size is not None and tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=size, mode="nearest")
    return mask.clamp(0.0, 1.0)


class MaskedGradientLoss(nn.Module):
    """L1 distance between Sobel gradients of prediction and target, weighted by a text mask.

    With Sobel kernels K_x = [[−1,0,1],[−2,0,2],[−1,0,1]], K_y = K_xᵀ applied per channel (cross-correlation,
    replicate padding) and a mask M ∈ [0, 1] broadcast over channels:

        ℓ = |K_x∗p − K_x∗q| + |K_y∗p − K_y∗q|
        L = reduce( (w_bg + (w_text − w_bg)·M) ⊙ ℓ )         (reduce = mean over all elements by default)

    Edges carry glyph shape, so this pushes the student on stroke boundaries inside text regions. The original
    toolkit's setting is w_text = 5, w_bg = 1; w_bg = 0 restricts the loss to the mask. Without a mask the loss is
    the unweighted ℓ. Replicate padding is used because zero padding would turn the image frame into a fake edge
    whose "gradient" is the raw border value.
    """

    def __init__(self, text_weight: float = 5.0, background_weight: float = 1.0) -> None:
        super().__init__()
        self.text_weight = float(text_weight)
        self.background_weight = float(background_weight)
        self.register_buffer("kernel_x", torch.tensor(_SOBEL_X).view(1, 1, 3, 3), persistent=False)
        self.register_buffer("kernel_y", torch.tensor(_SOBEL_Y).view(1, 1, 3, 3), persistent=False)

    def sobel(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (G_x, G_y) of a (B, C, H, W) tensor, in float32."""
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        channels = x.shape[1]
        padded = F.pad(x.float(), (1, 1, 1, 1), mode="replicate")
        kx = self.kernel_x.to(padded.device).expand(channels, 1, 3, 3)
        ky = self.kernel_y.to(padded.device).expand(channels, 1, 3, 3)
        return F.conv2d(padded, kx, groups=channels), F.conv2d(padded, ky, groups=channels)

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        reduction: Reduction = "mean",
    ) -> torch.Tensor:
        """Weighted gradient loss; ``mask`` (B, 1, H', W') or (B, H', W') is resized (nearest) to pred's size.

        ``reduction="none"`` returns the (B, C, H, W) per-element map, useful for inspection.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred_gx, pred_gy = self.sobel(pred)
        target_gx, target_gy = self.sobel(target)
        loss = (pred_gx - target_gx).abs() + (pred_gy - target_gy).abs()
        if mask is None:
            return _reduce(loss, reduction)
        mask = _as_nchw_mask(mask, "mask").to(device=loss.device, dtype=loss.dtype)
        if mask.shape[-2:] != loss.shape[-2:]:
            mask = F.interpolate(mask, size=loss.shape[-2:], mode="nearest")
        weight = self.background_weight + (self.text_weight - self.background_weight) * mask
        return _reduce(weight * loss, reduction)
