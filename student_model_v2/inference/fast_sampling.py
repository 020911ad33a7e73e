"""The pipeline's sampling loops, with no host synchronisation between the UNet calls.

``distillation/samplers.py`` holds the reference samplers: they call a diffusers scheduler's ``step`` at every
denoising step, which reads timesteps and schedule entries on the host (``.item()``, ``bool(t >= 0)``, a
``nonzero`` lookup of the step index) and draws the sampler noise from the CPU generator mid-loop, which on
a GPU is a pageable host-to-device copy that waits for the queued UNet work. None of that depends on the
latents, so here it all happens before the loop: the same diffusers schedulers (built by the reference
module's factories) give each step's timestep and coefficients as Python floats, the noise the reference
would draw is drawn up front in the same order from the same generator, and the per-step timestep tensors
are built once. The loop is then UNet calls and elementwise arithmetic queued back to back.

Every step of the four samplers (LCM, TCD, PCM = TCD with gamma 0, DDIM) has one affine form::

    x0   = (x - eps_scale * eps) / x0_divisor
    y    = x0_weight * x0 [+ sample_weight * x] [+ eps_weight * eps]      (the step's clean/noised estimate)
    next = y  or  next_scale * y + noise_scale * noise

with the coefficients computed by the same float32 tensor expressions as the diffusers ``step``, so on the
CPU the result equals the reference samplers' bit for bit (``tests/test_fast_paths.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..anytext2.model import AnyText2Model, Conditions, concat_conditions
from ..distillation.pcm import phase_top_timesteps
from ..distillation.samplers import (
    StudentSampling,
    make_ddim_scheduler,
    make_lcm_scheduler,
    make_tcd_scheduler,
    repeat_conditions,
    set_ddim_timesteps,
)


@dataclass(frozen=True)
class StepCoefficients:
    """One denoising step in the affine form of the module docstring (Python floats: no tensor reads later)."""

    timestep: int
    eps_scale: float
    x0_divisor: float
    x0_weight: float
    sample_weight: float = 0.0
    eps_weight: float = 0.0
    next_scale: float = 1.0
    noise_scale: float = 0.0

    @property
    def draws_noise(self) -> bool:
        return self.noise_scale != 0.0


def _f(value: torch.Tensor | float) -> float:
    return float(value)


def lcm_steps(steps: int, original_inference_steps: int, alphas_cumprod: torch.Tensor) -> list[StepCoefficients]:
    """``LCMScheduler.step`` (epsilon prediction) unrolled: denoised = c_out x0 + c_skip x, re-noised to the next timestep."""
    scheduler = make_lcm_scheduler(original_inference_steps, alphas_cumprod)
    scheduler.set_timesteps(steps)
    timesteps, alphas = scheduler.timesteps, scheduler.alphas_cumprod
    plan = []
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        alpha_t = alphas[t]
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        common = dict(timestep=int(t), eps_scale=_f((1 - alpha_t).sqrt()), x0_divisor=_f(alpha_t.sqrt()),
                      x0_weight=_f(c_out), sample_weight=_f(c_skip))
        if last:
            plan.append(StepCoefficients(**common))
            continue
        t_prev = timesteps[i + 1]
        alpha_prev = alphas[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod
        plan.append(StepCoefficients(**common, next_scale=_f(alpha_prev.sqrt()), noise_scale=_f((1 - alpha_prev).sqrt())))
    return plan


def tcd_steps(timesteps: torch.Tensor, gamma: float, alphas: torch.Tensor,
              final_alpha_cumprod: torch.Tensor) -> list[StepCoefficients]:
    """``TCDScheduler.step`` (epsilon prediction) unrolled: jump to s = floor((1 - gamma) t_prev), re-noise to t_prev."""
    plan = []
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        t_prev = timesteps[i + 1] if not last else torch.tensor(0)
        t_s = torch.floor((1 - gamma) * t_prev).to(dtype=torch.long)
        alpha_t, alpha_s = alphas[t], alphas[t_s]
        alpha_prev = alphas[t_prev] if t_prev >= 0 else final_alpha_cumprod
        common = dict(timestep=int(t), eps_scale=_f((1 - alpha_t).sqrt()), x0_divisor=_f(alpha_t.sqrt()),
                      x0_weight=_f(alpha_s.sqrt()), eps_weight=_f((1 - alpha_s).sqrt()))
        if gamma > 0 and not last:
            plan.append(StepCoefficients(**common, next_scale=_f((alpha_prev / alpha_s).sqrt()),
                                         noise_scale=_f((1 - alpha_prev / alpha_s).sqrt())))
        else:
            plan.append(StepCoefficients(**common))
    return plan


def student_steps(plan: StudentSampling, alphas_cumprod: torch.Tensor, gamma: float = 0.3) -> list[StepCoefficients]:
    """The coefficients of the planned student sampler (as ``distillation.samplers.sample_student`` runs it)."""
    if plan.name == "lcm":
        return lcm_steps(plan.steps, plan.original_inference_steps, alphas_cumprod)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD gamma must be in [0, 1], got {gamma}")
    scheduler = make_tcd_scheduler(plan.original_inference_steps, alphas_cumprod)
    if plan.name == "pcm":
        scheduler.set_timesteps(timesteps=phase_top_timesteps(plan.steps, plan.original_inference_steps))
        gamma = 0.0
    elif plan.name == "tcd":
        scheduler.set_timesteps(plan.steps)
    else:
        raise ValueError(f"unknown student sampler {plan.name!r}")
    return tcd_steps(scheduler.timesteps, gamma, scheduler.alphas_cumprod, scheduler.final_alpha_cumprod)


def ddim_steps(steps: int, eta: float, alphas_cumprod: torch.Tensor, anytext2_grid: bool = False) -> list[StepCoefficients]:
    """``DDIMScheduler.step`` (epsilon prediction) unrolled, on AnyText2's leading grid (or its exact upstream grid)."""
    scheduler = make_ddim_scheduler(alphas_cumprod)
    set_ddim_timesteps(scheduler, steps, anytext2_grid)
    alphas, stride = scheduler.alphas_cumprod, scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    plan = []
    for t in scheduler.timesteps:
        t_prev = t - stride
        alpha_t = alphas[t]
        alpha_prev = alphas[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod
        variance = ((1 - alpha_prev) / (1 - alpha_t)) * (1 - alpha_t / alpha_prev)
        std = eta * variance ** 0.5
        plan.append(StepCoefficients(
            timestep=int(t), eps_scale=_f((1 - alpha_t) ** 0.5), x0_divisor=_f(alpha_t ** 0.5),
            x0_weight=_f(alpha_prev ** 0.5), eps_weight=_f((1 - alpha_prev - std ** 2) ** 0.5),
            noise_scale=_f(std) if eta > 0 else 0.0))
    return plan


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``: through pinned memory with a non-blocking copy on CUDA (the host does not wait
    for the queued GPU work), unchanged on the CPU."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def draw_noise(plan: Sequence[StepCoefficients], shape: Sequence[int], generator: torch.Generator | None,
               device: torch.device) -> list[torch.Tensor | None]:
    """The noise each step adds, drawn now in the order the reference scheduler draws it mid-loop (diffusers'
    ``randn_tensor`` with a CPU generator draws on the CPU in float32), then copied to ``device`` in one go."""
    count = sum(step.draws_noise for step in plan)
    if count == 0:
        return [None] * len(plan)
    host_device = generator.device if generator is not None else torch.device("cpu")
    drawn = [torch.randn(tuple(shape), generator=generator, device=host_device, dtype=torch.float32) for _ in range(count)]
    stacked = to_device(torch.stack(drawn), device)
    noises, used = [], 0
    for step in plan:
        noises.append(stacked[used] if step.draws_noise else None)
        used += step.draws_noise
    return noises


def apply_step(step: StepCoefficients, x: torch.Tensor, eps: torch.Tensor,
               noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(next latents, the step's estimate) from the step's coefficients; branches only on Python floats."""
    x0 = (x - step.eps_scale * eps) / step.x0_divisor
    estimate = step.x0_weight * x0
    if step.sample_weight:
        estimate = estimate + step.sample_weight * x
    if step.eps_weight:
        estimate = estimate + step.eps_weight * eps
    if noise is None:
        return estimate, estimate
    if step.next_scale == 1.0:
        return estimate + step.noise_scale * noise, estimate
    return step.next_scale * estimate + step.noise_scale * noise, estimate


LoopHook = Callable[[], None]


def _timestep_tensors(plan: Sequence[StepCoefficients], rows: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.full((rows,), step.timestep, dtype=torch.long, device=device) for step in plan]


@torch.no_grad()
def run_student(model: AnyText2Model, cond: Conditions, plan: Sequence[StepCoefficients], latents: torch.Tensor,
                generator: torch.Generator | None, strength: float = 1.0, attnx_scale: float = 1.0, *,
                images_per_condition: int = 1, before_unet: LoopHook | None = None) -> torch.Tensor:
    """The student: WriteNet once, then one UNet pass per step, no CFG; returns the last step's estimate.

    Everything the loop needs (residuals repeated per image, timestep tensors, noise) is ready before it starts.
    ``before_unet`` runs before every UNet call (``acceleration.mark_step`` for CUDA graphs).
    """
    device = model.device
    latents = to_device(latents, device).float()
    noises = draw_noise(plan, latents.shape, generator, device)
    residuals = [r.repeat_interleave(images_per_condition, dim=0) for r in model.control_residuals(cond, strength)]
    conditions = repeat_conditions(cond, images_per_condition)
    timesteps = _timestep_tensors(plan, latents.shape[0], device)
    return denoise_student(model, plan, latents, conditions, residuals, timesteps, noises, attnx_scale, before_unet)


def denoise_student(model: AnyText2Model, plan: Sequence[StepCoefficients], latents: torch.Tensor,
                    conditions: Conditions, residuals: list[torch.Tensor], timesteps: Sequence[torch.Tensor],
                    noises: Sequence[torch.Tensor | None], attnx_scale: float,
                    before_unet: LoopHook | None) -> torch.Tensor:
    """The student's denoising loop proper: UNet calls and elementwise arithmetic only, nothing read back."""
    estimate = latents
    for step, t, noise in zip(plan, timesteps, noises):
        if before_unet is not None:
            before_unet()
        eps = model.predict_eps(latents, t, conditions, residuals, attnx_scale).float()
        latents, estimate = apply_step(step, latents, eps, noise)
    return estimate


@torch.no_grad()
def run_teacher(model: AnyText2Model, cond: Conditions, uncond: Conditions | None, plan: Sequence[StepCoefficients],
                latents: torch.Tensor, generator: torch.Generator | None, guidance_scale: float = 7.5,
                strength: float = 1.0, attnx_scale: float = 1.0, *, images_per_condition: int = 1,
                batch_cfg: bool = True, before_unet: LoopHook | None = None) -> torch.Tensor:
    """The teacher's DDIM with CFG: cond and uncond rows in one UNet call per step (``batch_cfg``), WriteNet once
    per branch; returns the final latents (``distillation.samplers.sample_teacher_ddim`` without its trajectory)."""
    device = model.device
    latents = to_device(latents, device).float()
    noises = draw_noise(plan, latents.shape, generator, device)
    guided = uncond is not None and guidance_scale != 1.0
    fused = guided and batch_cfg
    branches = [concat_conditions([cond, uncond])] if fused else ([cond, uncond] if guided else [cond])
    prepared = [(repeat_conditions(c, images_per_condition),
                 [r.repeat_interleave(images_per_condition, dim=0) for r in model.control_residuals(c, strength)])
                for c in branches]
    rows = latents.shape[0] * (2 if fused else 1)
    timesteps = _timestep_tensors(plan, rows, device)
    return denoise_teacher(model, plan, latents, prepared, timesteps, noises, guidance_scale if guided else None,
                           fused, attnx_scale, before_unet)


def denoise_teacher(model: AnyText2Model, plan: Sequence[StepCoefficients], latents: torch.Tensor,
                    prepared: Sequence[tuple[Conditions, list[torch.Tensor]]], timesteps: Sequence[torch.Tensor],
                    noises: Sequence[torch.Tensor | None], guidance_scale: float | None, fused: bool,
                    attnx_scale: float, before_unet: LoopHook | None) -> torch.Tensor:
    """The teacher's denoising loop proper (``guidance_scale`` None: no CFG); nothing read back to the host."""
    for step, t, noise in zip(plan, timesteps, noises):
        if before_unet is not None:
            before_unet()
        if fused:
            conditions, residuals = prepared[0]
            eps_c, eps_u = model.predict_eps(torch.cat([latents, latents]), t, conditions, residuals,
                                             attnx_scale).float().chunk(2)
        else:
            outputs = [model.predict_eps(latents, t, c, r, attnx_scale).float() for c, r in prepared]
            eps_c, eps_u = outputs[0], (outputs[1] if guidance_scale is not None else None)
        eps = eps_c if eps_u is None else eps_u + guidance_scale * (eps_c - eps_u)
        latents, _ = apply_step(step, latents, eps, noise)
    return latents
