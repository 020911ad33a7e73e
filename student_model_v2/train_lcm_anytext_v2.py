"""v2: the original toolkit's baseline — one-step x0 regression on the CFG teacher (not consistency distillation).

Per micro-batch: draw t from the fixed solver grid of ``--num_inference_steps`` points ([19, 39, …, 999] for
N = 50; the original's rounded linspace also held t = 0, where x0 regression is trivial, and is not used);
noise the latent to x_t; the target is the x0 the teacher predicts at (x_t, t) with classic CFG
uncond + s·(cond − uncond), s = ``--cfg_scale``, using AnyText2's own uncond (negative prompt, empty text
caption, same glyphs); the prediction is the student's x0 at the same (x_t, t). The student copies the
teacher's one-step guess, which is blurry at high t, so it does not learn to sample in few steps (use v2_4
for that); the script exists to compare versions side by side.

The frozen passes run the original's un-optimised way on purpose: two VAE encodes (img, masked_img), the
uncond captions encoded for every batch, and cond and uncond through the teacher as two WriteNet and two
UNet calls under ``no_grad``. v2_2 computes the same loss with its three speed-ups.

Usage: ``python student_model_v2/train_lcm_anytext_v2.py --use_mock_dataset`` (synthetic data, tiny random
teacher) or with ``--config models_yaml/anytext2_sd15.yaml --teacher_ckpt models/anytext_v2.0.ckpt``; or through
launch_from_yaml.py with train_config_template.yaml (``use_optimized: false``).
"""

from __future__ import annotations

import argparse
from typing import Any

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

import torch

from student_model_v2.distillation import lcm
from student_model_v2.training.trainer import Denoisers, LossOutput, Objective, PassPlan, make_parser, run


class X0RegressionObjective(Objective):
    """Student x0 at (x_t, t) regressed onto the CFG teacher's x0 at the same (x_t, t)."""

    name = "v2"
    passes = PassPlan(merged_vae=False, cache_uncond_captions=False, batched_teacher=False,
                      teacher_inference_mode=False)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--cfg_scale", type=float, default=7.5,
                            help="teacher guidance as the classic scale s of uncond + s*(cond - uncond) (AnyText2's "
                                 "eval setting 7.5 = LCM-form w 6.5)")
        parser.add_argument("--loss_type", choices=["legacy_huber", "l2", "huber"], default="legacy_huber",
                            help="legacy_huber = the original's F.huber_loss(delta=1); l2; "
                                 "huber = pseudo-Huber (huber_c)")
        parser.add_argument("--huber_c", type=float, default=lcm.HUBER_C, help="pseudo-Huber c of --loss_type huber")

    def __init__(self, args: argparse.Namespace, alphas_cumprod: torch.Tensor) -> None:
        super().__init__(args, alphas_cumprod)
        if not 1 <= args.num_inference_steps <= lcm.NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"--num_inference_steps must be in [1, {lcm.NUM_TRAIN_TIMESTEPS}], "
                             f"got {args.num_inference_steps}")
        self.solver = lcm.DDIMSolver(alphas_cumprod.cpu(), args.num_inference_steps).to(alphas_cumprod.device)
        self.guidance_w = lcm.lcm_w_from_cfg_scale(args.cfg_scale)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """t ~ U(solver grid) per sample: the start points of v2_4's timestep draw."""
        return lcm.sample_timestep_pairs(self.solver, batch_size, generator=generator, device=device).start

    def x0_pair(self, denoisers: Denoisers, latents: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(student x0 with grad, CFG-teacher x0 target) at one noisy latent per sample."""
        ac = self.alphas_cumprod
        timesteps = self.sample_timesteps(latents.shape[0], generator, latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        x_t = lcm.add_noise(latents, noise, timesteps, ac)
        eps_c, eps_u = denoisers.teacher_eps(x_t, timesteps)
        eps_cfg = lcm.lcm_guidance(eps_c, eps_u, self.guidance_w)
        target = lcm.predicted_origin(eps_cfg, timesteps, x_t, "epsilon", ac)
        pred = lcm.predicted_origin(denoisers.student_eps(x_t, timesteps), timesteps, x_t, "epsilon", ac)
        return pred, target

    def compute_loss(self, denoisers: Denoisers, latents: torch.Tensor, batch: dict[str, Any],
                     generator: torch.Generator) -> LossOutput:
        pred, target = self.x0_pair(denoisers, latents, generator)
        loss = lcm.consistency_loss(pred, target, self.args.loss_type, self.args.huber_c)
        return LossOutput(loss, {"x0": loss.detach()})


OBJECTIVE = X0RegressionObjective


def build_argument_parser() -> argparse.ArgumentParser:
    return make_parser(X0RegressionObjective, __doc__)


def main(argv: list[str] | None = None) -> None:
    run(X0RegressionObjective, argv, __doc__)


if __name__ == "__main__":
    main()
