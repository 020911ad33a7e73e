"""The ldm DDPM noise-schedule buffers that sit at the root of the AnyText2 state dict.

The checkpoint stores these 13 float32 vectors (12 schedule terms plus ``logvar``), and samplers
read them back, so they must be bit-identical to the original. That only happens when the same
operations run in the same precision: the betas come from a float64 ``torch.linspace`` of the
square roots, every derived term is computed in float64 NumPy with the original's operation order,
and only the final values are rounded to float32.
"""

from __future__ import annotations

import numpy as np
import torch

SCHEDULE_BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)


def linear_betas(linear_start: float, linear_end: float, timesteps: int) -> np.ndarray:
    """ldm's "linear" schedule (diffusers' ``scaled_linear``): squares of evenly spaced roots, float64."""
    roots = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64)
    return (roots**2).numpy()


def make_schedule_buffers(linear_start: float, linear_end: float, timesteps: int,
                          logvar_init: float = 0.0) -> dict[str, torch.Tensor]:
    """Return the 13 root buffers by their state-dict names, float32 CPU tensors of length ``timesteps``.

    The posterior variance uses ``v_posterior = 0`` (AnyText2's setting); the original's
    ``(1 - v) * betas * ... + v * betas`` then reduces exactly to the expression below.
    """
    betas = linear_betas(linear_start, linear_end, timesteps)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    one_minus = 1.0 - alphas_cumprod
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(one_minus),
        "log_one_minus_alphas_cumprod": np.log(one_minus),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        # The posterior variance is 0 at t = 0, hence the floor before the log.
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / one_minus,
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / one_minus,
    }
    buffers = {name: torch.tensor(value, dtype=torch.float32) for name, value in values.items()}
    buffers["logvar"] = torch.full((timesteps,), float(logvar_init), dtype=torch.float32)
    return buffers
