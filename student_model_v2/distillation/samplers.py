"""Samplers over the teacher's explicit operations, on diffusers schedulers.

The teacher sampler is AnyText2's DDIM with classifier-free guidance: cond and uncond rows go through
one batched UNet call per step, and the WriteNet runs once per sampling run for both (its outputs do
not depend on the latent or the timestep). The student sampler is LCM multistep consistency sampling
without guidance: one UNet pass per step, one WriteNet pass per run.

Both schedulers read the model's own ``alphas_cumprod`` buffer (ldm computes it in float64 and stores
float32; diffusers would recompute it in float32 and differ by up to ~5e-7), so the step arithmetic
sees exactly the numbers the original DDIM sampler reads.

``images_per_condition`` lets one conditions row serve several images: AnyText2 builds identical
conditioning for every image of a request, so conditions and WriteNet residuals are computed once and
repeated, and only the UNet sees the full image batch.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import DDIMScheduler, LCMScheduler

from ..anytext2.model import AnyText2Model, Conditions, concat_conditions
from .adapter_info import DEFAULT_LCM_GRID

NUM_TRAIN_TIMESTEPS = 1000
# LCMScheduler's ``original_inference_steps`` default and the diffusers/this toolkit's default training grid

# AnyText2's DDPM schedule in diffusers terms: ldm "linear" = scaled_linear, alpha_prev at the last
# step is alphas_cumprod[0] (set_alpha_to_one=False), timesteps arange(0, 1000, 1000 // S) + 1.
SCHEDULE_KWARGS = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
)


def _use_alphas(scheduler: DDIMScheduler | LCMScheduler, alphas_cumprod: torch.Tensor | None) -> None:
    """Swap in the model's stored schedule; alpha_prev past the first timestep stays alphas_cumprod[0]."""
    if alphas_cumprod is None:
        return
    alphas = alphas_cumprod.detach().to("cpu", torch.float32).clone()
    if alphas.shape != scheduler.alphas_cumprod.shape:
        raise ValueError(f"alphas_cumprod has shape {tuple(alphas.shape)}, the scheduler needs "
                         f"{tuple(scheduler.alphas_cumprod.shape)}")
    scheduler.alphas_cumprod = alphas
    scheduler.final_alpha_cumprod = alphas[0]


def make_ddim_scheduler(alphas_cumprod: torch.Tensor | None = None) -> DDIMScheduler:
    scheduler = DDIMScheduler(**SCHEDULE_KWARGS, steps_offset=1, timestep_spacing="leading")
    _use_alphas(scheduler, alphas_cumprod)
    return scheduler


def anytext2_ddim_timesteps(steps: int) -> torch.Tensor:
    """AnyText2's own DDIM grid, descending: ``arange(0, 1000, 1000 // S) + 1``.

    When S does not divide 1000 this has more than S entries (S = 30 gives 31 steps, 991 ... 1).
    """
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"DDIM steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {steps}")
    return (torch.arange(0, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS // steps) + 1).flip(0)


def set_ddim_timesteps(scheduler: DDIMScheduler, steps: int, anytext2_grid: bool = False) -> None:
    """``set_timesteps(steps)``, optionally replaced by AnyText2's grid.

    The scheduler keeps ``num_inference_steps = steps``, so its ``step`` looks back ``1000 // steps``
    timesteps for alpha_prev, which is exactly the upstream grid's stride even when that grid is longer.
    """
    scheduler.set_timesteps(steps)
    if anytext2_grid:
        scheduler.timesteps = anytext2_ddim_timesteps(steps)


def make_lcm_scheduler(original_inference_steps: int = DEFAULT_LCM_GRID, alphas_cumprod: torch.Tensor | None = None) -> LCMScheduler:
    """LCMScheduler on the training grid ``(i+1)*(1000//N) - 1`` (N = ``original_inference_steps``)."""
    scheduler = LCMScheduler(**SCHEDULE_KWARGS, original_inference_steps=original_inference_steps, timestep_scaling=10.0)
    _use_alphas(scheduler, alphas_cumprod)
    return scheduler


def repeat_conditions(conditions: Conditions, times: int) -> Conditions:
    """Each row repeated ``times`` times in place (row order r0, r0, r1, r1, ...), for the UNet."""
    if times == 1:
        return conditions

    def rep(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.repeat_interleave(times, dim=0)

    return replace(
        conditions,
        image_context=rep(conditions.image_context),
        text_context=rep(conditions.text_context),
        glyphs=[rep(g) for g in conditions.glyphs],
        positions=[rep(p) for p in conditions.positions],
        masked_x=rep(conditions.masked_x),
        image_context_mask=rep(conditions.image_context_mask),
        line_embeddings=None,
    )


def _initial_latents(model: AnyText2Model, rows: int, cond: Conditions, generator: torch.Generator | None,
                     latents: torch.Tensor | None) -> torch.Tensor:
    if latents is None:
        height, width = cond.masked_x.shape[-2:]
        device = generator.device if generator is not None else model.device
        latents = torch.randn((rows, model.config.latent_channels, height, width), generator=generator, device=device)
    elif latents.shape[0] != rows:
        raise ValueError(f"latents have {latents.shape[0]} rows, expected {rows} "
                         "(conditions rows x images_per_condition)")
    return latents.to(model.device, torch.float32)


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
    *,
    images_per_condition: int = 1,
    batch_cfg: bool = True,
    anytext2_grid: bool = False,
) -> torch.Tensor:
    """Return scaled latents after ``steps`` DDIM steps; ``eps = eps_u + s (eps_c - eps_u)``.

    With ``uncond`` None or ``guidance_scale == 1`` only the cond rows are evaluated (as upstream).
    ``batch_cfg=False`` runs cond and uncond as two UNet calls per step, in upstream's order; the
    default stacks them into one call. ``anytext2_grid`` uses AnyText2's timestep grid (see
    :func:`anytext2_ddim_timesteps`) instead of exactly ``steps`` diffusers timesteps.
    """
    scheduler = make_ddim_scheduler(model.alphas_cumprod)
    set_ddim_timesteps(scheduler, steps, anytext2_grid)
    rows = cond.batch_size * images_per_condition
    latents = _initial_latents(model, rows, cond, generator, latents)
    guided = uncond is not None and guidance_scale != 1.0
    if guided and batch_cfg:
        branches = [concat_conditions([cond, uncond])]
    else:
        branches = [cond, uncond] if guided else [cond]
    prepared = []
    for conditions in branches:
        residuals = model.control_residuals(conditions, strength)
        prepared.append((repeat_conditions(conditions, images_per_condition),
                         [r.repeat_interleave(images_per_condition, dim=0) for r in residuals]))
    for t in scheduler.timesteps:
        if guided and batch_cfg:
            conditions, residuals = prepared[0]
            eps_c, eps_u = model.predict_eps(torch.cat([latents, latents]), int(t), conditions, residuals,
                                             attnx_scale).float().chunk(2)
        else:
            outputs = [model.predict_eps(latents, int(t), c, r, attnx_scale).float() for c, r in prepared]
            eps_c, eps_u = outputs[0], (outputs[1] if guided else None)
        eps = eps_c if eps_u is None else eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return latents


@torch.no_grad()
def sample_student_lcm(
    model: AnyText2Model,
    cond: Conditions,
    steps: int = 4,
    generator: torch.Generator | None = None,
    original_inference_steps: int = DEFAULT_LCM_GRID,
    strength: float = 1.0,
    attnx_scale: float = 1.0,
    latents: torch.Tensor | None = None,
    *,
    images_per_condition: int = 1,
) -> torch.Tensor:
    """Return the scaled latents of ``steps``-step LCM sampling (the student: LoRA enabled, no CFG)."""
    scheduler = make_lcm_scheduler(original_inference_steps, model.alphas_cumprod)
    scheduler.set_timesteps(steps)
    rows = cond.batch_size * images_per_condition
    latents = _initial_latents(model, rows, cond, generator, latents)
    residuals = [r.repeat_interleave(images_per_condition, dim=0) for r in model.control_residuals(cond, strength)]
    conditions = repeat_conditions(cond, images_per_condition)
    denoised = latents
    for t in scheduler.timesteps:
        eps = model.predict_eps(latents, int(t), conditions, residuals, attnx_scale).float()
        latents, denoised = scheduler.step(eps, t, latents, generator=generator, return_dict=False)
    return denoised
