"""Optional glyph-sharpness terms next to a version's main loss: focal frequency and masked Sobel gradient.

One definition of their flags for every version that offers them: v2_3 (on by default, the original's
0.05/0.05) and v2_4 (off by default, applied to the boundary-scaled predictions). The ``--ffl_*``,
``--loss_mask_key`` and ``--loss_text_weight`` flags keep the original v2_3's names; its
``--loss_ffl_weight``/``--loss_grad_weight`` are aliases of ``--ffl_weight``/``--grad_weight``, so the
original templates' keys still work.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..distillation.losses import FocalFrequencyLoss, MaskedGradientLoss, text_mask_from_batch


def add_aux_loss_arguments(parser: argparse.ArgumentParser, ffl_weight: float, grad_weight: float) -> None:
    """The FFL / masked-gradient flags with a version's default weights (0 = term off)."""
    parser.add_argument("--ffl_weight", "--loss_ffl_weight", dest="ffl_weight", type=float, default=ffl_weight,
                        help="weight of the focal frequency loss between prediction and target (0 = off)")
    parser.add_argument("--grad_weight", "--loss_grad_weight", dest="grad_weight", type=float, default=grad_weight,
                        help="weight of the text-masked Sobel-gradient loss (0 = off)")
    parser.add_argument("--ffl_alpha", type=float, default=1.0, help="FFL focal exponent on the spectrum distance")
    parser.add_argument("--ffl_patch_factor", type=int, default=1,
                        help="FFL on a PxP grid of patches; P must divide the latent size")
    parser.add_argument("--ffl_ave_spectrum", action="store_true", help="FFL compares batch-averaged spectra")
    parser.add_argument("--ffl_log_matrix", action="store_true", help="FFL focal weights log(1 + w)")
    parser.add_argument("--ffl_batch_matrix", action="store_true",
                        help="normalise the FFL focal weights by the batch maximum instead of per spectrum")
    parser.add_argument("--loss_mask_key", choices=["hint", "positions", "inv_mask"], default="hint",
                        help="text mask of the gradient loss: hint/positions = the text lines; inv_mask = "
                             "1 - inv_mask, almost the whole image (the original's option, not a text mask)")
    parser.add_argument("--loss_text_weight", type=float, default=5.0,
                        help="gradient-loss weight inside the text mask (1 outside)")


class AuxiliaryLosses:
    """The active terms of ``add_aux_loss_arguments``'s flags, added to a main loss."""

    def __init__(self, args: argparse.Namespace) -> None:
        for flag in ("ffl_weight", "grad_weight"):
            if getattr(args, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
        self.ffl_weight = args.ffl_weight
        self.grad_weight = args.grad_weight
        self.mask_key = args.loss_mask_key
        self.ffl = FocalFrequencyLoss(alpha=args.ffl_alpha, patch_factor=args.ffl_patch_factor,
                                      ave_spectrum=args.ffl_ave_spectrum, log_matrix=args.ffl_log_matrix,
                                      batch_matrix=args.ffl_batch_matrix) if args.ffl_weight > 0 else None
        self.grad = MaskedGradientLoss(text_weight=args.loss_text_weight) if args.grad_weight > 0 else None

    def add(self, loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, batch: dict[str, Any],
            terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """``loss`` + the weighted active terms; each unweighted term goes into ``terms`` (detached, on the device)."""
        if self.ffl is not None:
            ffl = self.ffl(pred.float(), target.float())
            terms["ffl"] = ffl.detach()
            loss = loss + self.ffl_weight * ffl
        if self.grad is not None:
            mask = text_mask_from_batch(batch, self.mask_key, size=tuple(pred.shape[-2:])).to(pred.device)
            grad = self.grad(pred.float(), target.float(), mask)
            terms["grad"] = grad.detach()
            loss = loss + self.grad_weight * grad
        return loss
