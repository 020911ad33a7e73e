"""Latent-consistency (LCM-LoRA) math for distilling AnyText2, following the official diffusers recipe.

Reference: ``huggingface/diffusers: examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`` and
``LCMScheduler`` (see ``docs/lcm_reference.md`` §1-2). Everything here is pure torch on tensors so the trainer, the
sampler and the tests share one implementation and nothing depends on model code.

Conventions
-----------
* Schedule: AnyText2/SD1.5 DDPM, T = 1000, scaled-linear betas 0.00085..0.012 (``anytext2_alphas_cumprod``).
  ᾱ_t = alphas_cumprod[t], α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t).
* Solver grid (``ddim_solver_timesteps``): N points t_i = (i+1)·(T // N) − 1, i.e. [19, 39, …, 999] for N = 50; the
  same grid ``LCMScheduler`` builds from ``original_inference_steps`` and samples from at inference.
* Guidance: the ``w`` values sampled from ``[w_min, w_max]`` are in the **LCM form** — see ``lcm_guidance``.
* No guidance-scale embedding (``guidance_scale_embedding`` / ``w_embedding`` / ``timestep_cond``): the official
  LCM-LoRA script passes ``timestep_cond=None`` because a LoRA cannot add the ``time_cond_proj`` layer that the full
  LCM script trains. Guidance is baked into the LoRA at the sampled w instead, so it is deliberately absent here.
* Target network: LCM-LoRA uses the online LoRA model under ``no_grad`` (no EMA); that is the trainer's concern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
HUBER_C = 0.001

PredictionType = Literal["epsilon", "v_prediction", "sample"]
LossType = Literal["l2", "huber", "legacy_huber"]


def anytext2_alphas_cumprod(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """ᾱ_t of the AnyText2/SD1.5 schedule as the teacher stores it (float32 buffer ``alphas_cumprod``).

    Computed like ldm's ``register_schedule``: betas = linspace(√β_start, √β_end, T)² and the cumulative product in
    float64, cast to float32 only at the end. This reproduces the teacher's buffer bit for bit (diffusers computes
    the betas in float32 and differs by up to ~5e-7), so the distillation math sees the exact teacher schedule.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def ddim_solver_timesteps(
    num_ddim_timesteps: int = 50, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """Ascending solver grid t_i = (i+1)·(T // N) − 1, i = 0..N−1 (int64).

    This is both the official ``DDIMSolver`` grid and ``LCMScheduler``'s ``lcm_origin_timesteps`` for
    ``original_inference_steps = N``; training on it keeps train and inference timesteps identical (the original
    toolkit's rounded linspace with 0 included did not).
    """
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(
            f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}"
        )
    step_ratio = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.int64) * step_ratio - 1


def lcm_inference_timesteps(
    num_inference_steps: int,
    original_inference_steps: int = 50,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> list[int]:
    """Descending sampling timesteps ``LCMScheduler.set_timesteps`` uses (strength 1), e.g. 4 → [999, 759, 499, 259].

    Picks indices floor(linspace(0, N, n, endpoint=False)) from the reversed solver grid, so every sampling step is a
    timestep the student was trained on.
    """
    if not 1 <= num_inference_steps <= original_inference_steps:
        raise ValueError(
            f"num_inference_steps must be in [1, original_inference_steps={original_inference_steps}],"
            f" got {num_inference_steps}"
        )
    grid = ddim_solver_timesteps(original_inference_steps, num_train_timesteps).flip(0)
    indices = torch.div(
        torch.arange(num_inference_steps, dtype=torch.int64) * original_inference_steps,
        num_inference_steps,
        rounding_mode="floor",
    )
    return grid[indices].tolist()


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample (B,) tensor broadcasts against (B, C, H, W)."""
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_ndim is {target_ndim}")
    return x.reshape(*x.shape, *((1,) * missing))


def _gather(schedule: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """schedule[timesteps] as (B, 1, …, 1) on the timesteps' device, ready to broadcast against a sample."""
    values = schedule.to(device=timesteps.device)[timesteps.long()]
    return append_dims(values, ndim)


def add_noise(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion x_t = α_t·x0 + σ_t·ε (same as ``DDPMScheduler.add_noise``)."""
    abar = _gather(alphas_cumprod, timesteps, x0.ndim)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def predicted_origin(
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    prediction_type: PredictionType,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """x̂0 from a network output: ε → (x_t − σ·out)/α; v → α·x_t − σ·out; sample → out.

    AnyText2 is an ε model; v/sample are kept because the consistency function is defined on x̂0 and the same code
    then serves any SD-family teacher.
    """
    abar = _gather(alphas_cumprod, timesteps, sample.ndim)
    alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def predicted_noise(
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    prediction_type: PredictionType,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """ε̂ from a network output: ε → out; v → α·out + σ·x_t; sample → (x_t − α·out)/σ.

    The DDIM solver step needs ε̂ next to x̂0; with CFG both are combined separately (official recipe).
    """
    abar = _gather(alphas_cumprod, timesteps, sample.ndim)
    alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def model_output_from_origin(
    pred_x0: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    prediction_type: PredictionType,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Inverse of ``predicted_origin``: the network output that would yield x̂0 at (x_t, t).

    ε = (x_t − α·x̂0)/σ; v = α·ε − σ·x̂0; sample = x̂0. Used to express a consistency output (an x0 estimate) as a
    model output, e.g. for a sampler or a comparison in the teacher's own parameterisation.
    """
    abar = _gather(alphas_cumprod, timesteps, sample.ndim)
    alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    if prediction_type == "sample":
        return pred_x0
    eps = (sample - alpha * pred_x0) / sigma
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * pred_x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


class DDIMSolver:
    """Deterministic (η = 0) DDIM on the solver grid, equivalent to the official script's ``DDIMSolver``.

    Holds ᾱ on the grid and one grid interval earlier (ᾱ[0] before the first point, as the official solver and
    ``DDIMScheduler`` with ``set_alpha_to_one=False`` do), so a training step needs no schedule lookups beyond an
    index. ``lcm_step`` k > 1 makes one DDIM jump over k grid intervals (the original toolkit's ``lcm_step``), which
    is still a single teacher evaluation; k = 1 is the official recipe.
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        num_ddim_timesteps: int = 50,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    ) -> None:
        if alphas_cumprod.shape != (num_train_timesteps,):
            raise ValueError(
                f"alphas_cumprod must have shape ({num_train_timesteps},), got {tuple(alphas_cumprod.shape)}"
            )
        self.num_train_timesteps = num_train_timesteps
        self.num_ddim_timesteps = num_ddim_timesteps
        self.step_ratio = num_train_timesteps // num_ddim_timesteps
        self.alphas_cumprod = alphas_cumprod
        self.ddim_timesteps = ddim_solver_timesteps(num_ddim_timesteps, num_train_timesteps).to(
            alphas_cumprod.device
        )
        self.ddim_alpha_cumprods = alphas_cumprod[self.ddim_timesteps]
        self.ddim_alpha_cumprods_prev = torch.cat([alphas_cumprod[:1], self.ddim_alpha_cumprods[:-1]])

    def to(self, device: torch.device | str) -> DDIMSolver:
        """Move the schedule tensors so per-step gathers do not copy across devices."""
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        self.ddim_timesteps = self.ddim_timesteps.to(device)
        self.ddim_alpha_cumprods = self.ddim_alpha_cumprods.to(device)
        self.ddim_alpha_cumprods_prev = self.ddim_alpha_cumprods_prev.to(device)
        return self

    def target_timesteps(self, timestep_index: torch.Tensor, lcm_step: int = 1) -> torch.Tensor:
        """t_n = t_{n+k} − k·(T // N), clamped at 0 (at the first grid point the target is the clean end, t = 0)."""
        if lcm_step < 1:
            raise ValueError(f"lcm_step must be >= 1, got {lcm_step}")
        start = self.ddim_timesteps.to(timestep_index.device)[timestep_index.long()]
        return (start - lcm_step * self.step_ratio).clamp(min=0)

    def ddim_step(
        self,
        pred_x0: torch.Tensor,
        pred_eps: torch.Tensor,
        timestep_index: torch.Tensor,
        lcm_step: int = 1,
    ) -> torch.Tensor:
        """x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev)·ε̂ at the target of each start index (η = 0 DDIM)."""
        if lcm_step == 1:
            abar_prev = self.ddim_alpha_cumprods_prev.to(timestep_index.device)[timestep_index.long()]
        else:
            target = self.target_timesteps(timestep_index, lcm_step)
            abar_prev = self.alphas_cumprod.to(target.device)[target]
        abar_prev = append_dims(abar_prev, pred_x0.ndim)
        return abar_prev.sqrt() * pred_x0 + (1.0 - abar_prev).sqrt() * pred_eps


@dataclass(frozen=True)
class TimestepPairs:
    """One training draw: grid index i, start t_{n+k} = grid[i] and target t_n (clamped at 0), all (B,) int64."""

    index: torch.Tensor
    start: torch.Tensor
    target: torch.Tensor


def sample_timestep_pairs(
    solver: DDIMSolver,
    batch_size: int,
    lcm_step: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TimestepPairs:
    """i ~ U{0, …, N−1} per sample, start = grid[i], target = start − k·(T // N) clamped at 0.

    Sampling runs on the generator's device (torch requires it) and the result is moved to ``device``, so a CPU
    generator gives the same draws whatever the training device is.
    """
    sample_device = generator.device if generator is not None else device
    index = torch.randint(
        0, solver.num_ddim_timesteps, (batch_size,), generator=generator, device=sample_device
    ).to(device if device is not None else sample_device)
    start = solver.ddim_timesteps.to(index.device)[index]
    return TimestepPairs(index=index, start=start, target=solver.target_timesteps(index, lcm_step))


def scalings_for_boundary_conditions(
    timesteps: torch.Tensor,
    sigma_data: float = SIGMA_DATA,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM boundary scalings with t̃ = timestep_scaling·t: c_skip = σ_d²/(t̃² + σ_d²), c_out = t̃/√(t̃² + σ_d²).

    They force f(x, 0) = x (c_skip(0) = 1, c_out(0) = 0) while making the student an x̂0 predictor everywhere else
    (c_skip(19) ≈ 7e-6). Returned as float32 (B,) tensors; use ``append_dims`` to broadcast.
    """
    scaled = timestep_scaling * timesteps.to(torch.float32)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_output(
    sample: torch.Tensor,
    pred_x0: torch.Tensor,
    timesteps: torch.Tensor,
    sigma_data: float = SIGMA_DATA,
    timestep_scaling: float = TIMESTEP_SCALING,
) -> torch.Tensor:
    """Consistency function f(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t), for both the online and the target branch."""
    c_skip, c_out = scalings_for_boundary_conditions(timesteps, sigma_data, timestep_scaling)
    return append_dims(c_skip, sample.ndim) * sample + append_dims(c_out, sample.ndim) * pred_x0


def sample_guidance_scale(
    batch_size: int,
    w_min: float = 5.0,
    w_max: float = 15.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample LCM-form guidance w ~ U[w_min, w_max] (float32, (B,)); defaults are the official 5..15.

    Same sampling rule as the official script, (w_max − w_min)·rand + w_min. The values are LCM-form w (see
    ``lcm_guidance``): U[5, 15] here is classic CFG scale U[6, 16].
    """
    if w_max < w_min:
        raise ValueError(f"w_max ({w_max}) must be >= w_min ({w_min})")
    sample_device = generator.device if generator is not None else device
    u = torch.rand((batch_size,), generator=generator, device=sample_device, dtype=torch.float32)
    return ((w_max - w_min) * u + w_min).to(device if device is not None else sample_device)


def lcm_guidance(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """LCM-form classifier-free guidance: cond + w·(cond − uncond), applied to x̂0 and to ε̂ alike.

    Convention: ``w`` (and the ``w_min``/``w_max`` flags) are the official script's and the LCM paper's ω, whose
    guided estimate is (1 + ω)·cond − ω·uncond. The classic Imagen/diffusers scale s in uncond + s·(cond − uncond)
    is s = w + 1 (``cfg_scale_from_lcm_w``): w ∈ [5, 15] ≡ s ∈ [6, 16]; AnyText2's eval s = 7.5 ≡ w = 6.5. The
    original toolkit applied uncond + w·(cond − uncond) with w ∈ [5, 15], one unit weaker than the official recipe.
    A (B,) tensor w is broadcast per sample.
    """
    if isinstance(w, torch.Tensor):
        w = append_dims(w.to(cond.device), cond.ndim)
    return cond + w * (cond - uncond)


def cfg_scale_from_lcm_w(w: torch.Tensor | float) -> torch.Tensor | float:
    """Classic CFG scale s = w + 1 equivalent to LCM-form w (uncond + s·(cond − uncond) ≡ cond + w·(cond − uncond))."""
    return w + 1


def lcm_w_from_cfg_scale(s: torch.Tensor | float) -> torch.Tensor | float:
    """LCM-form w = s − 1 for a classic CFG scale s, e.g. to state AnyText2's eval s = 7.5 as w = 6.5."""
    return s - 1


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official default ``--loss_type l2``: element-mean MSE computed in float32 (stable under fp16 autocast)."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, huber_c: float = HUBER_C) -> torch.Tensor:
    """Official ``--loss_type huber``: mean(√((pred − target)² + c²) − c), per element, c = ``huber_c``.

    With c = 0.001 it behaves like L1 for latent errors ≫ 1e-3 (robust to outlier targets); it is not iCT's
    norm-based pseudo-Huber and not torch's ``huber_loss(delta)``.
    """
    if huber_c <= 0:
        raise ValueError(f"huber_c must be > 0, got {huber_c}")
    diff = pred.float() - target.float()
    return torch.mean(torch.sqrt(diff**2 + huber_c**2) - huber_c)


def legacy_toolkit_huber_loss(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """The original FlashGlyph toolkit's loss, ``F.huber_loss(delta=1)`` (mean), kept only to reproduce its runs.

    For latent errors < 1 it is ½·MSE, i.e. a different objective scale from both official losses.
    """
    return F.huber_loss(pred.float(), target.float(), delta=delta, reduction="mean")


def consistency_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: LossType = "l2",
    huber_c: float = HUBER_C,
) -> torch.Tensor:
    """Dispatch on the trainer's ``--loss_type``: ``l2`` | ``huber`` (pseudo-Huber, official) | ``legacy_huber``."""
    if loss_type == "l2":
        return l2_loss(pred, target)
    if loss_type == "huber":
        return pseudo_huber_loss(pred, target, huber_c)
    if loss_type == "legacy_huber":
        return legacy_toolkit_huber_loss(pred, target)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected l2, huber or legacy_huber")


@dataclass(frozen=True)
class ConsistencyDraw:
    """The random part of one consistency-distillation micro-batch: timestep pairs, x at the start, w.

    LCM (v2_4) and PCM (v2_5) draw these in the same order from the same generator, so the two objectives
    see identical draws for the same seed (what the M = 1 equivalence test relies on).
    """

    pairs: TimestepPairs
    x_start: torch.Tensor
    w: torch.Tensor


def draw_consistency_sample(
    solver: DDIMSolver,
    latents: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    lcm_step: int = 1,
    w_min: float = 5.0,
    w_max: float = 15.0,
) -> ConsistencyDraw:
    """Grid index and pair, fresh noise → x at the start timestep, and per-sample LCM-form w (in this order)."""
    batch_size, device = latents.shape[0], latents.device
    pairs = sample_timestep_pairs(solver, batch_size, lcm_step, generator=generator, device=device)
    noise = torch.randn(latents.shape, generator=generator, device=device)
    x_start = add_noise(latents, noise, pairs.start, alphas_cumprod)
    w = sample_guidance_scale(batch_size, w_min, w_max, generator=generator, device=device)
    return ConsistencyDraw(pairs=pairs, x_start=x_start, w=w)


def guided_solver_step(
    eps_cond: torch.Tensor,
    eps_uncond: torch.Tensor | None,
    draw: ConsistencyDraw,
    solver: DDIMSolver,
    alphas_cumprod: torch.Tensor,
    lcm_step: int = 1,
) -> torch.Tensor:
    """The teacher's DDIM solver step from the draw's start: LCM-form CFG on x̂0 and ε̂ (official recipe).

    ``eps_uncond`` None is the CFG-free solver (PCM's ``--not_apply_cfg_solver``): the cond prediction alone.
    """
    start = draw.pairs.start
    x0 = predicted_origin(eps_cond, start, draw.x_start, "epsilon", alphas_cumprod)
    eps = eps_cond
    if eps_uncond is not None:
        x0 = lcm_guidance(x0, predicted_origin(eps_uncond, start, draw.x_start, "epsilon", alphas_cumprod), draw.w)
        eps = lcm_guidance(eps_cond, eps_uncond, draw.w)
    return solver.ddim_step(x0, eps, draw.pairs.index, lcm_step)
