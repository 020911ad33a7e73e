"""LoRA on the teacher's UNet and WriteNet: one copy of the base weights serves teacher and student.

With the adapters disabled the model *is* the teacher; with them enabled it is the student. This halves
memory against the original toolkit's two full model copies and makes "student = teacher at step 0"
hold exactly (LoRA B starts at zero).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..anytext2.model import AnyText2Model

ATTENTION_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")
FROZEN_WRITENET_BLOCKS = ("glyph_block", "position_block", "fuse_block_za")


def lora_target_modules(model: AnyText2Model) -> list[str]:
    """Full names of the modules that get LoRA.

    Attention q/k/v/out of the UNet (AttnX included) and the WriteNet, plus the WriteNet's output
    convs: its 12 ``zero_convs`` and ``middle_block_out`` (the 13th control output; the original
    toolkit skipped it only because its name lacks "zero_convs"). Text encoder, OCR copies, embedding
    manager, VAE and the glyph/position/fuse blocks stay frozen without adapters.
    """
    targets = []
    for name, module in model.named_modules():
        if not name.startswith(("model.diffusion_model.", "control_model.")):
            continue
        if any(block in name for block in FROZEN_WRITENET_BLOCKS):
            continue
        if isinstance(module, nn.Linear) and name.endswith(ATTENTION_SUFFIXES):
            targets.append(name)
        elif isinstance(module, nn.Conv2d) and (".zero_convs." in name or name.startswith("control_model.middle_block_out.")):
            targets.append(name)
    return sorted(targets)


def add_lora(model: AnyText2Model, rank: int, alpha: float, dropout: float = 0.0) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; every base parameter is frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(model), bias="none")
    return get_peft_model(model, config)


def load_lora(model: AnyText2Model, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    """Apply a saved adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    for param in model.parameters():
        param.requires_grad_(False)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def _lora_layers(model: nn.Module) -> Iterator[BaseTunerLayer]:
    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base weights only (the teacher) inside the block, then restore the adapters."""
    layers = list(_lora_layers(model))
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
