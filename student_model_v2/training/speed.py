"""Exact speed settings of the trainer: TF32 matmuls/convolutions and AdamW's fused kernel.

Both are chosen once when the trainer is built and reported in its log, so a run says which path it
took. Model-level acceleration (``torch.compile``, channels-last) is not here: it changes the model's
modules, so it belongs where the trainer prepares the models (after LoRA is attached, before
``accelerator.prepare`` wraps the student).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch

FUSED_ADAMW_DEVICES = ("cuda", "cpu")
FUSED_ADAMW_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def configure_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA (Ampere and later), or full float32.

    TF32 keeps float32's range with a 10-bit mantissa in the tensor cores' multiplies (accumulation
    stays float32). It only affects float32 operations on CUDA: under bf16/fp16 autocast the UNet's
    matmuls are already half precision, and on the CPU the settings are read by nothing.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def tf32_state() -> dict[str, bool]:
    """The TF32 switches as torch holds them now (for logs and benchmark JSON)."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` takes these parameters: floating point, on CUDA or CPU."""
    params = list(params)
    return bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.dtype in FUSED_ADAMW_DTYPES for p in params)


def build_adamw(params: list[torch.nn.Parameter], args: argparse.Namespace) -> tuple[torch.optim.AdamW, str]:
    """AdamW from the flags and the implementation it runs: "fused" (one kernel for all parameters) or "unfused".

    Fused is the default wherever torch supports the parameters (``--no_fused_adamw`` turns it off); it
    computes the same update as torch's default path (tests/test_train_speed.py checks steps on the CPU)
    and keeps its step counters on the parameters' device, so the update reads nothing back to the host.
    """
    fused = not args.no_fused_adamw and fused_adamw_supported(params)
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=fused or None,
    )
    return optimizer, "fused" if fused else "unfused"


def keep_implementation(optimizer: torch.optim.Optimizer, implementation: str) -> None:
    """Re-apply this run's AdamW implementation after ``load_state_dict``.

    A loaded state dict brings the saving run's param groups, ``fused`` flag included, and its step
    counters where that run kept them (CPU unless fused). Without this a run resumed from an unfused
    checkpoint would silently stay unfused (and vice versa), or the fused kernel would meet CPU step
    counters next to CUDA parameters. The unfused path keeps its counters on the CPU, where reading
    them for the bias correction costs no device sync.
    """
    fused = implementation == "fused"
    for group in optimizer.param_groups:
        group["fused"] = fused or None
        group["foreach"] = None
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and "step" in state:
                state["step"] = state["step"].to(param.device if fused else torch.device("cpu"), torch.float32)
