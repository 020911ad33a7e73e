"""v2_3: v2_2 (one-step x0 regression on the CFG teacher, fast passes) plus glyph-sharpness losses.

L = main(pred, target) + ffl_weight·FFL(pred, target) + grad_weight·G(pred, target; M), on the student's and
the CFG teacher's x0 latents (B×4×h×w). FFL is the focal frequency loss (knobs ``--ffl_*``); G is the Sobel
gradient L1, weighted 1 + (loss_text_weight − 1)·M inside the text mask M from ``--loss_mask_key``. Defaults
are the original's (0.05 / 0.05, hint mask, text weight 5); its ``--loss_ffl_weight``/``--loss_grad_weight``
names are accepted. The same terms are available to v2_4 (off by default there).

Usage: through launch_from_yaml.py with train_config_template_v3.yaml, or directly with the v2 flags.
"""

from __future__ import annotations

import argparse
from typing import Any

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

import torch

from student_model_v2.distillation import lcm
from student_model_v2.train_lcm_anytext_v2_2 import FastX0RegressionObjective
from student_model_v2.training.aux_losses import AuxiliaryLosses, add_aux_loss_arguments
from student_model_v2.training.trainer import Denoisers, LossOutput, make_parser, run


class X0RegressionWithGlyphLosses(FastX0RegressionObjective):
    """v2_2's x0 regression plus focal-frequency and text-masked gradient terms on the x0 latents."""

    name = "v2_3"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        FastX0RegressionObjective.add_arguments(parser)
        add_aux_loss_arguments(parser, ffl_weight=0.05, grad_weight=0.05)

    def __init__(self, args: argparse.Namespace, alphas_cumprod: torch.Tensor) -> None:
        super().__init__(args, alphas_cumprod)
        self.aux = AuxiliaryLosses(args)

    def compute_loss(self, denoisers: Denoisers, latents: torch.Tensor, batch: dict[str, Any],
                     generator: torch.Generator) -> LossOutput:
        pred, target = self.x0_pair(denoisers, latents, generator)
        main = lcm.consistency_loss(pred, target, self.args.loss_type, self.args.huber_c)
        terms = {"x0": main.detach()}
        return LossOutput(self.aux.add(main, pred, target, batch, terms), terms)


OBJECTIVE = X0RegressionWithGlyphLosses


def build_argument_parser() -> argparse.ArgumentParser:
    return make_parser(X0RegressionWithGlyphLosses, __doc__)


def main(argv: list[str] | None = None) -> None:
    run(X0RegressionWithGlyphLosses, argv, __doc__)


if __name__ == "__main__":
    main()
