"""Samplers over the teacher's explicit operations, on diffusers schedulers.

The teacher sampler is AnyText2's DDIM with classifier-free guidance: cond and uncond rows go through
one batched UNet call per step, and the WriteNet runs once per sampling run for both (its outputs do
not depend on the latent or the timestep).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from .anytext2.model import AnyText2Model, Conditions, concat_conditions

# AnyText2's DDPM schedule in diffusers terms: ldm "linear" = scaled_linear, alpha_prev at the last
# step is alphas_cumprod[0] (set_alpha_to_one=False), timesteps arange(0, 1000, 1000 // S) + 1.
SCHEDULE_KWARGS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
)


def make_ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE_KWARGS, steps_offset=1, timestep_spacing="leading")


@torch.no_grad()
def sample_teacher_ddim(
    model: AnyText2Model,
    cond: Conditions,
    uncond: Conditions | None,
    steps: int = 20,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    strength: float = 1.0,
    attnx_scale: float = 1.0,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return scaled latents after ``steps`` DDIM steps; ``eps = eps_u + s (eps_c - eps_u)``.

    With ``uncond`` None or ``guidance_scale == 1`` only the cond rows are evaluated.
    """
    scheduler = make_ddim_scheduler()
    scheduler.set_timesteps(steps)
    batch = cond.batch_size
    height, width = cond.masked_x.shape[-2:]
    if latents is None:
        latents = torch.randn((batch, model.config.latent_channels, height, width), generator=generator)
    latents = latents.to(model.device, torch.float32)
    guided = uncond is not None and guidance_scale != 1.0
    conditions = concat_conditions([cond, uncond]) if guided else cond
    residuals = model.control_residuals(conditions, strength)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if guided else latents
        eps = model.predict_eps(model_input, int(t), conditions, residuals, attnx_scale).float()
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return latents
