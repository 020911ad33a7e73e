"""Samplers over the teacher's explicit operations, on diffusers schedulers.

The teacher sampler is AnyText2's DDIM with classifier-free guidance: cond and uncond rows go through
one batched UNet call per step, and the WriteNet runs once per sampling run for both (its outputs do
not depend on the latent or the timestep). The student samplers run without guidance, one UNet pass per
step and one WriteNet pass per run:

* ``sample_student_lcm``: LCM multistep consistency sampling (``LCMScheduler``; fresh noise between steps);
* ``sample_student_pcm``: phased consistency sampling, deterministic, one jump per phase from its top to its
  lower edge (``TCDScheduler`` with gamma 0 on the phase-top timesteps: its step is exactly that DDIM jump,
  ending at ᾱ[0]);
* ``sample_student_tcd``: TCD's strategic stochastic sampling with ``gamma`` on an LCM student
  (``TCDScheduler`` on the LCM timesteps; gamma 0 is deterministic, gamma 1 re-noises fully like LCM).

Both schedulers read the model's own ``alphas_cumprod`` buffer (ldm computes it in float64 and stores
float32; diffusers would recompute it in float32 and differ by up to ~5e-7), so the step arithmetic
sees exactly the numbers the original DDIM sampler reads.

``images_per_condition`` lets one conditions row serve several images: AnyText2 builds identical
conditioning for every image of a request, so conditions and WriteNet residuals are computed once and
repeated, and only the UNet sees the full image batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

from ..anytext2.model import AnyText2Model, Conditions, concat_conditions
from .adapter_info import DEFAULT_LCM_GRID, AdapterInfo, training_grid
from .pcm import phase_top_timesteps

NUM_TRAIN_TIMESTEPS = 1000
# LCMScheduler's ``original_inference_steps`` default and the diffusers/this toolkit's default training grid

# AnyText2's DDPM schedule in diffusers terms: ldm "linear" = scaled_linear, alpha_prev at the last
# step is alphas_cumprod[0] (set_alpha_to_one=False), timesteps arange(0, 1000, 1000 // S) + 1.
SCHEDULE_KWARGS = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
)


def _use_alphas(scheduler: DDIMScheduler | LCMScheduler | TCDScheduler, alphas_cumprod: torch.Tensor | None) -> None:
    """Swap in the model's stored schedule; alpha_prev past the first timestep stays alphas_cumprod[0]."""
    if alphas_cumprod is None:
        return
    alphas = alphas_cumprod.detach().to("cpu", torch.float32).clone()
    if alphas.shape != scheduler.alphas_cumprod.shape:
        raise ValueError(f"alphas_cumprod has shape {tuple(alphas.shape)}, the scheduler needs "
                         f"{tuple(scheduler.alphas_cumprod.shape)}")
    scheduler.alphas_cumprod = alphas
    scheduler.final_alpha_cumprod = alphas[0]


def make_ddim_scheduler(alphas_cumprod: torch.Tensor | None = None, trailing: bool = False) -> DDIMScheduler:
    """AnyText2's DDIM (leading spacing, offset 1: 981 … 1 for 50 steps), or ``trailing`` spacing.

    Trailing spacing starts every run at t = 999 (999, 749, 499, 249 for 4 steps) and for 50 steps is exactly
    the distillation solver grid 999, 979, …, 19; evaluation uses it so that the teacher's trajectory passes
    through the grid points the students were trained on.
    """
    if trailing:
        scheduler = DDIMScheduler(**SCHEDULE_KWARGS, timestep_spacing="trailing")
    else:
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
    trailing: bool = False,
    trajectory: list[tuple[int, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Return scaled latents after ``steps`` DDIM steps; ``eps = eps_u + s (eps_c - eps_u)``.

    With ``uncond`` None or ``guidance_scale == 1`` only the cond rows are evaluated (as upstream).
    ``batch_cfg=False`` runs cond and uncond as two UNet calls per step, in upstream's order; the
    default stacks them into one call. ``anytext2_grid`` uses AnyText2's timestep grid (see
    :func:`anytext2_ddim_timesteps`) instead of exactly ``steps`` diffusers timesteps; ``trailing`` uses
    trailing spacing (see :func:`make_ddim_scheduler`). A ``trajectory`` list receives (t, latents at t) before
    every step and (0, final latents) at the end (0 stands for the ᾱ[0] end point).
    """
    if anytext2_grid and trailing:
        raise ValueError("anytext2_grid and trailing are two different timestep grids: pick one")
    scheduler = make_ddim_scheduler(model.alphas_cumprod, trailing)
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
        if trajectory is not None:
            trajectory.append((int(t), latents))
        if guided and batch_cfg:
            conditions, residuals = prepared[0]
            eps_c, eps_u = model.predict_eps(torch.cat([latents, latents]), int(t), conditions, residuals,
                                             attnx_scale).float().chunk(2)
        else:
            outputs = [model.predict_eps(latents, int(t), c, r, attnx_scale).float() for c, r in prepared]
            eps_c, eps_u = outputs[0], (outputs[1] if guided else None)
        eps = eps_c if eps_u is None else eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    if trajectory is not None:
        trajectory.append((0, latents))
    return latents


def make_tcd_scheduler(original_inference_steps: int = 50, alphas_cumprod: torch.Tensor | None = None) -> TCDScheduler:
    """TCDScheduler on the training grid ``(i+1)*(1000//N) - 1``: ``set_timesteps(n)`` picks LCM's timesteps.

    (``original_inference_steps`` goes into the config, not into ``set_timesteps``, where diffusers would switch
    to an arbitrary 0..999 origin grid.)
    """
    scheduler = TCDScheduler(**SCHEDULE_KWARGS, original_inference_steps=original_inference_steps)
    _use_alphas(scheduler, alphas_cumprod)
    return scheduler


def _student_loop(model: AnyText2Model, cond: Conditions, scheduler: LCMScheduler | TCDScheduler,
                  generator: torch.Generator | None, strength: float, attnx_scale: float,
                  latents: torch.Tensor | None, images_per_condition: int, **step_kwargs: float) -> torch.Tensor:
    """One student UNet pass per scheduler timestep, WriteNet once; returns the last step's clean estimate."""
    rows = cond.batch_size * images_per_condition
    latents = _initial_latents(model, rows, cond, generator, latents)
    residuals = [r.repeat_interleave(images_per_condition, dim=0) for r in model.control_residuals(cond, strength)]
    conditions = repeat_conditions(cond, images_per_condition)
    estimate = latents
    for t in scheduler.timesteps:
        eps = model.predict_eps(latents, int(t), conditions, residuals, attnx_scale).float()
        latents, estimate = scheduler.step(eps, t, latents, generator=generator, return_dict=False, **step_kwargs)
    return estimate


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
    return _student_loop(model, cond, scheduler, generator, strength, attnx_scale, latents, images_per_condition)


@torch.no_grad()
def sample_student_pcm(
    model: AnyText2Model,
    cond: Conditions,
    num_phases: int = 4,
    generator: torch.Generator | None = None,
    original_inference_steps: int = DEFAULT_LCM_GRID,
    strength: float = 1.0,
    attnx_scale: float = 1.0,
    latents: torch.Tensor | None = None,
    *,
    images_per_condition: int = 1,
) -> torch.Tensor:
    """Return the scaled latents of phased-consistency sampling: ``num_phases`` deterministic student jumps.

    Timesteps are the phase tops (999, 739, 499, 239 for 4 phases of the 50-point grid), each step a DDIM jump
    with the student's x̂0 and ε̂ to the next top, the last one to ᾱ[0]: exactly the jumps v2_5 trains. The
    ``generator`` only draws the initial latents (no noise is injected).
    """
    scheduler = make_tcd_scheduler(original_inference_steps, model.alphas_cumprod)
    scheduler.set_timesteps(timesteps=phase_top_timesteps(num_phases, original_inference_steps))
    return _student_loop(model, cond, scheduler, generator, strength, attnx_scale, latents, images_per_condition,
                         eta=0.0)


@torch.no_grad()
def sample_student_tcd(
    model: AnyText2Model,
    cond: Conditions,
    steps: int = 4,
    gamma: float = 0.3,
    generator: torch.Generator | None = None,
    original_inference_steps: int = DEFAULT_LCM_GRID,
    strength: float = 1.0,
    attnx_scale: float = 1.0,
    latents: torch.Tensor | None = None,
    *,
    images_per_condition: int = 1,
) -> torch.Tensor:
    """Return the scaled latents of ``steps``-step TCD sampling with stochasticity ``gamma`` (TCD's default 0.3)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD gamma must be in [0, 1], got {gamma}")
    scheduler = make_tcd_scheduler(original_inference_steps, model.alphas_cumprod)
    scheduler.set_timesteps(steps)
    return _student_loop(model, cond, scheduler, generator, strength, attnx_scale, latents, images_per_condition,
                         eta=gamma)


STUDENT_SAMPLERS = ("auto", "lcm", "pcm", "tcd")
DEFAULT_STUDENT_STEPS = 4


@dataclass(frozen=True)
class StudentSampling:
    """A resolved student sampler: ``name`` (lcm | pcm | tcd), its step count and the training solver grid N."""

    name: str
    steps: int
    original_inference_steps: int


def plan_student_sampling(requested: str, steps: int | None, info: AdapterInfo | None) -> StudentSampling:
    """Which student sampler and step count an adapter can serve; a ``ValueError`` says why not.

    ``auto`` follows the adapter's ``distillation.json``: a ``pcm`` adapter samples with the PCM sampler in
    exactly ``num_phases`` steps (it was trained to jump between its phase edges only, so other step counts,
    or the LCM/TCD samplers that jump to x0, are refused); ``lcm`` and ``x0_regression`` adapters and folders
    without the file use LCM sampling (4 steps by default). ``tcd`` serves the same adapters as ``lcm``.
    Step counts above the training grid N are refused (every sampling timestep must be a grid point).
    """
    if requested not in STUDENT_SAMPLERS:
        raise ValueError(f"unknown student sampler {requested!r}; choose one of {', '.join(STUDENT_SAMPLERS)}")
    grid = training_grid(info)
    trained_pcm = info is not None and info.objective == "pcm"
    name = ("pcm" if trained_pcm else "lcm") if requested == "auto" else requested
    source = f"the adapter ({info.version}, objective {info.objective})" if info is not None else "the adapter"
    if name == "pcm":
        if not trained_pcm:
            raise ValueError(f"the PCM sampler needs a phased-consistency (v2_5) adapter; {source} maps every "
                             "step to x0: use --sampler lcm or tcd")
        if steps is not None and steps != info.num_phases:
            raise ValueError(f"{source} was trained with {info.num_phases} phases, so its sampler takes exactly "
                             f"{info.num_phases} steps (one jump per phase), not {steps}")
        return StudentSampling("pcm", info.num_phases, grid)
    if trained_pcm:
        raise ValueError(f"{source} only jumps to its {info.num_phases} phase edges, not to x0 as the {name} "
                         f"sampler needs: use --sampler pcm (or auto) with {info.num_phases} steps")
    steps = DEFAULT_STUDENT_STEPS if steps is None else steps
    if not 1 <= steps <= grid:
        raise ValueError(f"{source} was trained on a {grid}-point solver grid, so the {name} sampler takes 1 to "
                         f"{grid} steps, not {steps}")
    return StudentSampling(name, steps, grid)


@torch.no_grad()
def sample_student(
    model: AnyText2Model,
    cond: Conditions,
    plan: StudentSampling,
    generator: torch.Generator | None = None,
    strength: float = 1.0,
    attnx_scale: float = 1.0,
    latents: torch.Tensor | None = None,
    *,
    gamma: float = 0.3,
    images_per_condition: int = 1,
) -> torch.Tensor:
    """Run the planned student sampler (``gamma`` is TCD's stochasticity; the other samplers ignore it)."""
    common = dict(generator=generator, original_inference_steps=plan.original_inference_steps, strength=strength,
                  attnx_scale=attnx_scale, latents=latents, images_per_condition=images_per_condition)
    if plan.name == "pcm":
        return sample_student_pcm(model, cond, plan.steps, **common)
    if plan.name == "tcd":
        return sample_student_tcd(model, cond, plan.steps, gamma, **common)
    return sample_student_lcm(model, cond, plan.steps, **common)
