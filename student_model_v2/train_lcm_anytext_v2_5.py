"""v2_5: phased consistency distillation (PCM-LoRA) of AnyText2 — true multi-step consistency.

The DDIM solver grid of v2_4 (``--num_inference_steps`` N, default 50) is split into ``--num_phases`` M
phases (phase starts floor(k·N/M)); consistency is enforced only inside a phase. Per micro-batch: pick a grid
index i, start s = t_i; noise the latent to x_s; one DDIM step of the CFG teacher (AnyText2's own uncond,
LCM-form w ~ U[w_min, w_max], or the cond prediction alone with ``--no_cfg_teacher``) to t_{i-1}, which never
passes the lower edge of i's phase; the prediction is the student's DDIM jump from (x_s, s) to that edge; the
target is the online student's jump from the teacher's point to the same edge without grad, or the teacher's
point itself when it already is the edge. Loss: pseudo-Huber or l2 between the two jumped latents.

Same model passes as v2_4 (one batched teacher call, one student call, one target call; the target reuses the
student's WriteNet residuals). With M = 1 this is v2_4's loss with the jump's own boundary scalings
(``distillation/pcm.py``). Sample with one student step per phase (``--sampler pcm``, steps = M).

Usage: ``python student_model_v2/train_lcm_anytext_v2_5.py --help`` or through launch_from_yaml.py with
train_config_template_v5.yaml.
"""

from __future__ import annotations

import argparse
from typing import Any

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

import torch

from student_model_v2.distillation import lcm, pcm
from student_model_v2.training.trainer import Denoisers, LossOutput, Objective, make_parser, run

PHASE_CHOICES = (1, 2, 4, 8)


class PCMObjective(Objective):
    """Phased consistency distillation with the online student as target network (PCM-LoRA)."""

    name = "v2_5"
    kind = "pcm"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--num_phases", type=int, choices=PHASE_CHOICES, default=4,
                            help="phases M of the solver grid; the student samples in exactly M steps")
        parser.add_argument("--w_min", type=float, default=4.0,
                            help="LCM-form guidance w (classic CFG scale s = w + 1); PCM's SD1.5 recipe uses 4..5")
        parser.add_argument("--w_max", type=float, default=5.0)
        parser.add_argument("--no_cfg_teacher", action="store_true",
                            help="CFG-free teacher solver (PCM's --not_apply_cfg_solver): cond prediction only, "
                                 "no uncond rows; the student then keeps classifier-free guidance usable")
        parser.add_argument("--loss_type", choices=["l2", "huber"], default="huber",
                            help="pseudo-Huber (huber_c, PCM's recipe) or l2")
        parser.add_argument("--huber_c", type=float, default=lcm.HUBER_C)

    def __init__(self, args: argparse.Namespace, alphas_cumprod: torch.Tensor) -> None:
        super().__init__(args, alphas_cumprod)
        if args.w_min > args.w_max:
            raise ValueError(f"--w_min {args.w_min} > --w_max {args.w_max}")
        if not args.num_phases <= args.num_inference_steps:
            raise ValueError(f"--num_phases {args.num_phases} exceeds the solver grid "
                             f"(--num_inference_steps {args.num_inference_steps})")
        self.solver = lcm.DDIMSolver(alphas_cumprod.cpu(), args.num_inference_steps).to(alphas_cumprod.device)
        self.phases = pcm.PhaseSchedule(self.solver, args.num_phases)
        self.needs_uncond = not args.no_cfg_teacher

    def num_phases(self) -> int:
        return self.args.num_phases

    def _jump(self, eps: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
              index: torch.Tensor) -> torch.Tensor:
        x0 = lcm.predicted_origin(eps, timesteps, sample, "epsilon", self.alphas_cumprod)
        return self.phases.jump(x0, eps, index)

    def prediction_and_target(self, denoisers: Denoisers, latents: torch.Tensor,
                              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, lcm.ConsistencyDraw]:
        """(student's jump to the phase edge with grad, no-grad target, the draw) of one micro-batch."""
        args, ac = self.args, self.alphas_cumprod
        draw = lcm.draw_consistency_sample(self.solver, latents, ac, generator, 1, args.w_min, args.w_max)
        pairs, x_s = draw.pairs, draw.x_start
        x_t = lcm.guided_solver_step(*denoisers.teacher_eps(x_s, pairs.start), draw, self.solver, ac)

        pred = self._jump(denoisers.student_eps(x_s, pairs.start), pairs.start, x_s, pairs.index)
        with torch.no_grad():
            jumped = self._jump(denoisers.target_eps(x_t, pairs.target), pairs.target, x_t, pairs.index)
            # at a phase start the jump from the teacher's point to its own timestep is the identity in exact
            # arithmetic (pcm.jump_scalings gives c_skip 1, c_out 0); take the point itself, free of round-off
            on_edge = lcm.append_dims(self.phases.at_phase_start(pairs.index), x_t.ndim)
            target = torch.where(on_edge, x_t, jumped)
        return pred, target, draw

    def compute_loss(self, denoisers: Denoisers, latents: torch.Tensor, batch: dict[str, Any],
                     generator: torch.Generator) -> LossOutput:
        pred, target, _ = self.prediction_and_target(denoisers, latents, generator)
        loss = lcm.consistency_loss(pred, target, self.args.loss_type, self.args.huber_c)
        return LossOutput(loss, {"pcm": loss.detach()})


OBJECTIVE = PCMObjective


def build_argument_parser() -> argparse.ArgumentParser:
    return make_parser(PCMObjective, __doc__)


def main(argv: list[str] | None = None) -> None:
    run(PCMObjective, argv, __doc__)


if __name__ == "__main__":
    main()
