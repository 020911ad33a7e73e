"""v2_4: LCM-LoRA consistency distillation of AnyText2 (the official recipe, done right).

Per micro-batch: pick a grid index i, start s = (i+1)*(1000//N) - 1 and target t = s - k*(1000//N)
(clamped at 0); noise the latent to x_s; one DDIM step of the CFG teacher (AnyText2's own uncond,
LCM-form guidance w ~ U[w_min, w_max]) gives x_t; the target is the online student's boundary-scaled
x0 at (x_t, t) without grad; the prediction is the student's boundary-scaled x0 at (x_s, s).

Usage: ``python student_model_v2/train_lcm_anytext_v2_4.py --help`` or through launch_from_yaml.py.
"""

from __future__ import annotations

import argparse
from typing import Any

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

import torch

from student_model_v2.distillation import lcm
from student_model_v2.training.aux_losses import AuxiliaryLosses, add_aux_loss_arguments
from student_model_v2.training.trainer import Denoisers, LossOutput, Objective, make_parser, run


class LCMObjective(Objective):
    """Consistency distillation with the online student as target network (LCM-LoRA)."""

    name = "v2_4"
    kind = "lcm"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--w_min", type=float, default=5.0, help="LCM-form guidance w (classic CFG scale s = w + 1)")
        parser.add_argument("--w_max", type=float, default=15.0)
        parser.add_argument("--lcm_step", type=int, default=1, help="grid points k between start and target")
        parser.add_argument("--sigma_data", type=float, default=lcm.SIGMA_DATA)
        parser.add_argument("--timestep_scaling", type=float, default=lcm.TIMESTEP_SCALING)
        parser.add_argument("--loss_type", choices=["l2", "huber", "legacy_huber"], default="l2",
                            help="l2, pseudo-Huber (huber_c) or the original toolkit's Huber delta=1")
        parser.add_argument("--huber_c", type=float, default=lcm.HUBER_C)
        parser.add_argument("--target_from_teacher", action="store_true",
                            help="legacy (original v2_4 template): regress the CFG teacher's x0 at x_t instead of "
                                 "the student's consistency target (not LCM; one more teacher UNet call on the "
                                 "cond + uncond rows, reusing the teacher's WriteNet residuals)")
        add_aux_loss_arguments(parser, ffl_weight=0.0, grad_weight=0.0)

    def __init__(self, args: argparse.Namespace, alphas_cumprod: torch.Tensor) -> None:
        super().__init__(args, alphas_cumprod)
        if args.w_min > args.w_max:
            raise ValueError(f"--w_min {args.w_min} > --w_max {args.w_max}")
        if not 1 <= args.lcm_step < args.num_inference_steps:
            raise ValueError(f"--lcm_step must be in [1, {args.num_inference_steps - 1}]")
        if args.timestep_scaling <= 0:
            raise ValueError("--timestep_scaling must be > 0")
        self.solver = lcm.DDIMSolver(alphas_cumprod.cpu(), args.num_inference_steps).to(alphas_cumprod.device)
        self.aux = AuxiliaryLosses(args)

    def _boundary(self, sample: torch.Tensor, pred_x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return lcm.consistency_output(sample, pred_x0, timesteps, self.args.sigma_data, self.args.timestep_scaling)

    def compute_loss(self, denoisers: Denoisers, latents: torch.Tensor, batch: dict[str, Any],
                     generator: torch.Generator) -> LossOutput:
        args, ac = self.args, self.alphas_cumprod
        draw = lcm.draw_consistency_sample(self.solver, latents, ac, generator, args.lcm_step, args.w_min, args.w_max)
        pairs, x_s, w = draw.pairs, draw.x_start, draw.w
        x_t = lcm.guided_solver_step(*denoisers.teacher_eps(x_s, pairs.start), draw, self.solver, ac, args.lcm_step)

        eps_student = denoisers.student_eps(x_s, pairs.start)
        pred = self._boundary(x_s, lcm.predicted_origin(eps_student, pairs.start, x_s, "epsilon", ac), pairs.start)

        with torch.no_grad():
            if args.target_from_teacher:
                t_c, t_u = denoisers.teacher_eps(x_t, pairs.target)
                target_eps = lcm.lcm_guidance(t_c, t_u, w)
            else:
                target_eps = denoisers.target_eps(x_t, pairs.target)
            target = self._boundary(x_t, lcm.predicted_origin(target_eps, pairs.target, x_t, "epsilon", ac), pairs.target)

        main = lcm.consistency_loss(pred, target, args.loss_type, args.huber_c)
        terms = {"lcm": main.detach()}
        return LossOutput(self.aux.add(main, pred, target, batch, terms), terms)


OBJECTIVE = LCMObjective


def build_argument_parser() -> argparse.ArgumentParser:
    return make_parser(LCMObjective, __doc__)


def main(argv: list[str] | None = None) -> None:
    run(LCMObjective, argv, __doc__)


if __name__ == "__main__":
    main()
