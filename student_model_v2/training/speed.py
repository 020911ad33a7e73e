"""Speed settings of the trainer: TF32 matmuls/convolutions, AdamW's fused kernel, and the opt-in
model-level ones (``torch.compile``, channels-last) of ``anytext2/acceleration.py``.

All are chosen once when the trainer is built and reported in its log, so a run says which path it
took. The model-level ones are applied where the trainer prepares the models: after LoRA is attached
(the compiled code traces the LoRA layers), before ``accelerator.prepare`` wraps the student.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
from torch import nn

from ..anytext2.acceleration import COMPILE_MODES, CUDA_GRAPH_MODE, Acceleration, accelerate_model

FUSED_ADAMW_DEVICES = ("cuda", "cpu")
FUSED_ADAMW_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# CUDA graphs replay fixed memory; the teacher and the student call the same modules in turn (adapters off
# and on), and backward needs the forward's activations, so training offers the graph-free modes only
TRAINING_COMPILE_MODES = tuple(mode for mode in COMPILE_MODES if mode != CUDA_GRAPH_MODE)
# the VAE decoder does not run in training (latents are encoded, never decoded, except in previews)
TRAINED_MODULES = ("unet", "writenet")


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


def check_model_speed_flags(args: argparse.Namespace) -> None:
    """Refuse a compile setting that would be ignored, before the model is built."""
    if not args.compile and (args.compile_mode != "default" or args.compile_backend != "inductor"):
        flag = "--compile_mode" if args.compile_mode != "default" else "--compile_backend"
        raise ValueError(f"{flag} needs --compile")


def accelerate_trained_modules(model: nn.Module, args: argparse.Namespace) -> Acceleration:
    """Channels-last and/or ``torch.compile`` for the UNet and WriteNet, from the flags (no-op without them)."""
    return accelerate_model(model, compile=args.compile, compile_mode=args.compile_mode,
                            channels_last=args.channels_last, backend=args.compile_backend, modules=TRAINED_MODULES)
