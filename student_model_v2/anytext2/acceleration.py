"""Model-level speed-ups of a loaded AnyText2 model: channels-last weights and ``torch.compile``.

They apply to the three modules that carry almost all of the FLOPs of sampling and training: the UNet, the
WriteNet and the VAE decoder. Both are opt-in because neither is bit-exact against eager PyTorch:
channels-last picks other convolution kernels and the compiler fuses and reorders float arithmetic, so
outputs move by float round-off (``tests/test_fast_paths.py`` bounds the difference on the tiny config).

Compilation uses ``nn.Module.compile``, which compiles a module's call in place: parameter names and
state dicts are unchanged (checkpoints, LoRA loading and merging keep working). Graphs are specialised to
fixed shapes (``dynamic=False``): the student and teacher batches each get their own graph, compiled on
first use, so warm up once per shape before timing.

``compile_mode="reduce-overhead"`` records CUDA graphs. Only the UNet gets it, the module a sampler calls
several times per request at a fixed shape; the WriteNet and the decoder run once per request, so they
are compiled in the default mode (a graph would save one launch sequence and keep their outputs in the
graph pool, where the next replay would overwrite them). A sampling loop calls :func:`mark_step` before
each UNet call so each replay may reuse the previous one's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODE = "reduce-overhead"


@dataclass(frozen=True)
class Acceleration:
    """What :func:`accelerate_model` applied: the compile mode per module (None: eager; the backend's name for
    a backend other than inductor) and channels-last."""

    compiled: dict[str, str | None]
    channels_last: bool

    @property
    def cuda_graphs(self) -> bool:
        return CUDA_GRAPH_MODE in self.compiled.values()


def accelerated_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The UNet, the WriteNet and the VAE decoder of an ``AnyText2Model`` (or of a peft model wrapping one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"unet": base.model.diffusion_model, "writenet": base.control_model, "vae_decoder": base.first_stage_model.decoder}


def accelerate_model(model: nn.Module, *, compile: bool, compile_mode: str | None = None, channels_last: bool,
                     backend: str = "inductor", modules: tuple[str, ...] = ("unet", "writenet", "vae_decoder")) -> Acceleration:
    """Convert the UNet, WriteNet and VAE decoder of ``model`` to channels-last and/or compile them, in place.

    ``compile_mode``: one of :data:`COMPILE_MODES` (None = ``default``); ignored unless ``compile``. Call it
    once the weights are final (after a LoRA is merged): compiled code is traced from the modules as they are.
    ``backend`` other than inductor (e.g. ``aot_eager``, which traces the same graphs without generating
    kernels) takes no mode; ``modules`` limits the work to some of the three.
    """
    mode = compile_mode or "default"
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    compiled: dict[str, str | None] = {}
    for name, module in accelerated_modules(model).items():
        if name not in modules:
            continue
        if channels_last:
            module.to(memory_format=torch.channels_last)
        if compile:
            module_mode = mode if name == "unet" or mode != CUDA_GRAPH_MODE else "default"
            if backend != "inductor":
                module.compile(backend=backend, dynamic=False)
                module_mode = backend
            else:
                module.compile(mode=None if module_mode == "default" else module_mode, dynamic=False)
            compiled[name] = module_mode
        else:
            compiled[name] = None
    return Acceleration(compiled, channels_last)


def mark_step() -> None:
    """Tell the CUDA-graph runtime a new UNet replay starts (the previous replay's outputs were consumed)."""
    torch.compiler.cudagraph_mark_step_begin()
