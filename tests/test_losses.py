"""Focal frequency and masked gradient losses against values computed by hand on inputs with known spectra/gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from student_model_v2.distillation.losses import FocalFrequencyLoss, MaskedGradientLoss, text_mask_from_batch


def _constant(value: float, size: int = 4) -> torch.Tensor:
    return torch.full((1, 1, size, size), value)


def _dc_plus_cosine() -> torch.Tensor:
    """1 + cos(πx/2) on 4×4 (constant along y): orthonormal FFT has |F| = 4 at DC and 2 at (0, ±1), zero elsewhere."""
    row = 1.0 + torch.cos(torch.arange(4) * math.pi / 2)
    return row.expand(4, 4).reshape(1, 1, 4, 4).clone()


def _ramp(size: int = 5, slope: float = 1.0) -> torch.Tensor:
    """p[i, j] = slope·j: Sobel-x is 8·slope inside, 4·slope on the first/last column (replicate padding), Sobel-y 0."""
    return (slope * torch.arange(size, dtype=torch.float32)).expand(size, size).reshape(1, 1, size, size).clone()


class TestFocalFrequencyLoss:
    @pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
    def test_constant_image_only_dc_counts(self, alpha: float) -> None:
        # DC = 3·√16 = 12, weight 1 after normalisation: FFL = 12² / 16 = 9 = c², whatever alpha.
        loss = FocalFrequencyLoss(alpha=alpha)(_constant(3.0), _constant(0.0))
        assert loss.item() == pytest.approx(9.0, rel=1e-6)

    @pytest.mark.parametrize(
        ("alpha", "log_matrix", "expected"),
        [
            (1.0, False, (16 + 2 * 0.5 * 4) / 16),  # W = |d|/4 → 1 at DC, 0.5 at the two cosine bins
            (2.0, False, (16 + 2 * 0.25 * 4) / 16),  # W = |d|²/16 → 0.25
            (1.0, True, (16 + 2 * 4 * math.log(3) / math.log(5)) / 16),  # W = log(1+|d|)/log 5
        ],
    )
    def test_focal_weights_on_known_spectrum(self, alpha: float, log_matrix: bool, expected: float) -> None:
        loss = FocalFrequencyLoss(alpha=alpha, log_matrix=log_matrix)(_dc_plus_cosine(), torch.zeros(1, 1, 4, 4))
        assert loss.item() == pytest.approx(expected, rel=1e-6)

    def test_alpha_zero_is_mse_by_parseval(self) -> None:
        gen = torch.Generator().manual_seed(0)
        pred, target = torch.randn(2, 2, 3, 8, 8, generator=gen)
        loss = FocalFrequencyLoss(alpha=0.0)(pred, target)
        assert loss.item() == pytest.approx(F.mse_loss(pred, target).item(), rel=1e-5)

    def test_patch_factor_normalises_each_patch(self) -> None:
        # 8×8 image of four constant 4×4 quadrants 1, 2, 3, 4: each patch has DC 4v and weight 1 → mean(v²) = 7.5.
        quadrants = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1)
        pred, target = quadrants.view(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
        assert FocalFrequencyLoss(patch_factor=2)(pred, target).item() == pytest.approx(7.5, rel=1e-6)
        # batch_matrix: one max over all patches (16) → weights v/4 → Σ 16v²·v/4 / 64 = 6.25.
        batch_norm = FocalFrequencyLoss(patch_factor=2, batch_matrix=True)(pred, target)
        assert batch_norm.item() == pytest.approx(6.25, rel=1e-6)
        with pytest.raises(ValueError, match="patch_factor 3"):
            FocalFrequencyLoss(patch_factor=3)(pred, target)

    def test_batch_matrix_normalises_over_the_batch(self) -> None:
        pred = torch.cat([_constant(1.0), _constant(2.0)])
        target = torch.zeros_like(pred)
        # per sample: weights 1 and 1 → (16 + 64) / 32; batch: weights 0.5 and 1 → (8 + 64) / 32.
        assert FocalFrequencyLoss()(pred, target).item() == pytest.approx(2.5, rel=1e-6)
        assert FocalFrequencyLoss(batch_matrix=True)(pred, target).item() == pytest.approx(2.25, rel=1e-6)

    def test_ave_spectrum_compares_batch_mean_spectra(self) -> None:
        x = torch.randn(1, 3, 4, 4)
        pred = torch.cat([x, -x])
        assert FocalFrequencyLoss(ave_spectrum=True)(pred, torch.zeros_like(pred)).item() == pytest.approx(0.0)
        assert FocalFrequencyLoss()(pred, torch.zeros_like(pred)).item() > 0.1

    def test_loss_weight_scales(self) -> None:
        loss = FocalFrequencyLoss(loss_weight=0.5)(_constant(3.0), _constant(0.0))
        assert loss.item() == pytest.approx(4.5, rel=1e-6)

    def test_focal_weight_is_not_differentiated(self) -> None:
        # With W held fixed, L = Σ W|F p|²/N is a quadratic form whose gradient is 2/N · Re(IFFT(W ⊙ FFT p)).
        pred = _dc_plus_cosine().requires_grad_(True)
        FocalFrequencyLoss(alpha=1.0)(pred, torch.zeros(1, 1, 4, 4)).backward()
        spectrum = torch.fft.fft2(pred.detach(), norm="ortho")
        weight = spectrum.abs() / spectrum.abs().max()
        expected = 2 / 16 * torch.fft.ifft2(weight * spectrum, norm="ortho").real
        torch.testing.assert_close(pred.grad, expected, rtol=1e-5, atol=1e-6)

    def test_works_on_latents_and_images(self) -> None:
        ffl = FocalFrequencyLoss(patch_factor=2)
        for shape in [(2, 4, 8, 8), (1, 3, 16, 16)]:
            pred = torch.randn(shape, requires_grad=True)
            loss = ffl(pred, torch.randn(shape))
            loss.backward()
            assert loss.ndim == 0 and torch.isfinite(pred.grad).all()

    def test_identical_inputs_give_zero_without_nan(self) -> None:
        x = torch.randn(1, 4, 8, 8)
        loss = FocalFrequencyLoss()(x, x.clone())
        assert loss.item() == 0.0


class TestMaskedGradientLoss:
    def test_sobel_of_a_ramp(self) -> None:
        gx, gy = MaskedGradientLoss().sobel(_ramp(slope=2.0))
        assert gx[0, 0, :, 1:4].unique().tolist() == [16.0]
        assert gx[0, 0, :, [0, 4]].unique().tolist() == [8.0]
        assert gy.abs().max().item() == 0.0
        gx_t, gy_t = MaskedGradientLoss().sobel(_ramp(slope=2.0).transpose(-1, -2))
        torch.testing.assert_close(gy_t, gx.transpose(-1, -2))
        assert gx_t.abs().max().item() == 0.0

    def test_unmasked_value(self) -> None:
        # per row: 3 interior columns of 8 + 2 border columns of 4 = 32; 5 rows / 25 pixels → 6.4.
        loss = MaskedGradientLoss()(_ramp(), torch.zeros(1, 1, 5, 5))
        assert loss.item() == pytest.approx(6.4, rel=1e-6)

    def test_text_and_background_weights(self) -> None:
        mask = torch.zeros(1, 1, 5, 5)
        mask[..., 2] = 1.0  # middle column: 5 pixels of loss 8
        loss = MaskedGradientLoss(text_weight=5.0, background_weight=1.0)(_ramp(), torch.zeros(1, 1, 5, 5), mask)
        assert loss.item() == pytest.approx((160 + 4 * 40) / 25, rel=1e-6)
        text_only = MaskedGradientLoss(text_weight=1.0, background_weight=0.0)(_ramp(), torch.zeros(1, 1, 5, 5), mask)
        assert text_only.item() == pytest.approx(40 / 25, rel=1e-6)

    @pytest.mark.parametrize("shape", [(2, 4, 16, 16), (2, 3, 64, 64)])
    def test_text_weight_only_is_zero_outside_the_mask(self, shape: tuple[int, int, int, int]) -> None:
        gen = torch.Generator().manual_seed(0)
        hint = torch.zeros(2, 64, 64, 1)  # collated T3 layout (B, H, W, 1)
        hint[0, 8:24, 4:40] = 1.0
        hint[1, 40:60, 20:28] = 1.0
        mask = text_mask_from_batch({"hint": hint}, "hint", shape[-2:])
        pred, target = torch.randn(2, *shape, generator=gen)
        per_element = MaskedGradientLoss(text_weight=1.0, background_weight=0.0)(pred, target, mask, "none")
        outside = (mask == 0).expand_as(per_element)
        assert per_element[outside].abs().max().item() == 0.0
        assert per_element[~outside].min().item() >= 0.0 and per_element[~outside].sum().item() > 0.0
        unweighted = MaskedGradientLoss()(pred, target, reduction="none")
        torch.testing.assert_close(per_element[~outside], unweighted[~outside])

    def test_mask_at_another_resolution_is_resized(self) -> None:
        gen = torch.Generator().manual_seed(1)
        pred, target = torch.randn(2, 1, 4, 8, 8, generator=gen)
        full_res = torch.zeros(1, 1, 64, 64)
        full_res[..., :32, :] = 1.0
        loss = MaskedGradientLoss(2.0, 1.0)
        torch.testing.assert_close(loss(pred, target, full_res), loss(pred, target, full_res[..., ::8, ::8]))

    def test_gradient_flows_to_prediction(self) -> None:
        pred = torch.randn(1, 4, 8, 8, requires_grad=True)
        MaskedGradientLoss()(pred, torch.zeros(1, 4, 8, 8)).backward()
        assert pred.grad is not None and pred.grad.abs().sum() > 0


class TestTextMaskFromBatch:
    def test_layouts_agree(self) -> None:
        nchw = (torch.rand(2, 1, 8, 8) > 0.5).float()
        from_nchw = text_mask_from_batch({"hint": nchw}, "hint")
        from_nhwc = text_mask_from_batch({"hint": nchw.permute(0, 2, 3, 1)}, "hint")
        from_bhw = text_mask_from_batch({"hint": nchw[:, 0]}, "hint")
        assert torch.equal(from_nchw, nchw) and torch.equal(from_nhwc, nchw) and torch.equal(from_bhw, nchw)

    def test_positions_union_equals_hint(self) -> None:
        first, second = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
        first[..., 0:2, 0:4] = 1.0
        second[..., 1:5, 2:6] = 1.0
        union = text_mask_from_batch({"positions": [first, second]}, "positions")
        assert torch.equal(union, torch.clamp(first + second, 0, 1))

    def test_inv_mask_gives_the_kept_region(self) -> None:
        inv = torch.zeros(1, 8, 8, 1)
        inv[0, :2] = 1.0
        kept = text_mask_from_batch({"inv_mask": inv}, "inv_mask")
        assert kept[0, 0, :2].sum() == 0 and kept[0, 0, 2:].min() == 1.0

    def test_nearest_resize(self) -> None:
        stripes = torch.zeros(1, 1, 8, 8)
        stripes[..., ::2] = 1.0  # columns 0, 2, 4, 6 — exactly the ones nearest 8→4 samples
        assert text_mask_from_batch({"hint": stripes}, "hint", (4, 4)).min().item() == 1.0

    def test_errors_name_the_key(self) -> None:
        with pytest.raises(KeyError, match="positions"):
            text_mask_from_batch({"hint": torch.zeros(1, 1, 4, 4)}, "positions")
        with pytest.raises(ValueError, match="hint"):
            text_mask_from_batch({"hint": torch.zeros(1, 2, 4, 4)}, "hint")
        with pytest.raises(ValueError, match="mask source"):
            text_mask_from_batch({"hint": torch.zeros(1, 1, 4, 4)}, "glyphs")  # type: ignore[arg-type]
