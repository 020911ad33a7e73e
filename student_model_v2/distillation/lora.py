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

from ..anytext2.attention import CrossAttention, FeedForward, SpatialTransformer
from ..anytext2.model import AnyText2Model
from ..anytext2.unet import Downsample, ResBlock, Upsample
from .adapter_check import check_adapter
from .lora_targets import DEFAULT_LORA_TARGETS, LORA_TARGET_SETS

FROZEN_WRITENET_BLOCKS = ("glyph_block", "position_block", "fuse_block_za")
WRITENET_OUTPUTS = "writenet_outputs"

# The diffusers LCM-LoRA script's target list (``train_lcm_distill_lora_sd_wds.py``), each entry mapped
# to the LDM module that plays the same role in AnyText2: (diffusers name, owning class, child path).
OFFICIAL_LDM_MAP: tuple[tuple[str, type[nn.Module], str], ...] = (
    ("to_q", CrossAttention, "to_q"),
    ("to_k", CrossAttention, "to_k"),
    ("to_v", CrossAttention, "to_v"),
    ("to_out.0", CrossAttention, "to_out.0"),
    ("proj_in", SpatialTransformer, "proj_in"),
    ("proj_out", SpatialTransformer, "proj_out"),
    ("ff.net.0.proj", FeedForward, "net.0.proj"),
    ("ff.net.2", FeedForward, "net.2"),
    ("conv1", ResBlock, "in_layers.2"),
    ("conv2", ResBlock, "out_layers.3"),
    ("conv_shortcut", ResBlock, "skip_connection"),
    ("time_emb_proj", ResBlock, "emb_layers.1"),
    ("downsamplers.0.conv", Downsample, "op"),
    ("upsamplers.0.conv", Upsample, "conv"),
)
ATTENTION_NAMES = ("to_q", "to_k", "to_v", "to_out.0")


def _in_scope(name: str) -> bool:
    """UNet and WriteNet modules, except the WriteNet's frozen glyph/position/fuse encoders."""
    return name.startswith(("model.diffusion_model.", "control_model.")) and not any(
        block in name for block in FROZEN_WRITENET_BLOCKS)


def _is_writenet_output(name: str) -> bool:
    return name.startswith("control_model.zero_convs.") or name.startswith("control_model.middle_block_out.")


def _unwrapped_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``named_modules`` as before LoRA was added: a LoRA layer stands for its base layer, its insides vanish."""
    found: dict[str, nn.Module] = {}
    tuners: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in tuners):
            continue
        if isinstance(module, BaseTunerLayer):
            tuners.append(f"{name}.")
            module = module.get_base_layer()
        found[name] = module
    return found


def lora_target_groups(model: nn.Module, targets: str = DEFAULT_LORA_TARGETS) -> dict[str, list[str]]:
    """The modules that get LoRA, grouped by the diffusers LCM-LoRA name they correspond to.

    ``official``: every entry of :data:`OFFICIAL_LDM_MAP` (attention, feed-forward, transformer
    projections, ResBlock convs/shortcut/time projection, down/up-sampling convs) in the UNet, AttnX
    included, and in the WriteNet's trainable part. ``attention``: the original toolkit's set, only
    the attention q/k/v/out. Both add the WriteNet's output convs (group ``writenet_outputs``): its
    12 ``zero_convs`` and ``middle_block_out`` (the 13th control output; the original toolkit skipped
    it only because its name lacks "zero_convs"). Text encoder, OCR copies, embedding manager, VAE,
    time embeddings, the input/output convs and the glyph/position/fuse blocks stay frozen without
    adapters, as the diffusers script leaves conv_in/conv_out and the time embedding alone.
    """
    if targets not in LORA_TARGET_SETS:
        raise ValueError(f"--lora_targets {targets!r} is not one of {', '.join(LORA_TARGET_SETS)}")
    wanted = ATTENTION_NAMES if targets == "attention" else tuple(name for name, _, _ in OFFICIAL_LDM_MAP)
    groups: dict[str, list[str]] = {name: [] for name in wanted}
    groups[WRITENET_OUTPUTS] = []
    modules = _unwrapped_modules(model)
    for owner_name, owner in modules.items():
        if not _in_scope(owner_name):
            continue
        for diffusers_name, owner_cls, child in OFFICIAL_LDM_MAP:
            if diffusers_name in groups and isinstance(owner, owner_cls):
                full = f"{owner_name}.{child}"
                if isinstance(modules.get(full), (nn.Linear, nn.Conv2d)):
                    groups[diffusers_name].append(full)
        if _is_writenet_output(owner_name) and isinstance(owner, nn.Conv2d):
            groups[WRITENET_OUTPUTS].append(owner_name)
    return {name: sorted(found) for name, found in groups.items()}


def lora_target_modules(model: nn.Module, targets: str = DEFAULT_LORA_TARGETS) -> list[str]:
    """Full names of the modules that get LoRA under the target set ``targets`` (see :func:`lora_target_groups`)."""
    return sorted(name for names in lora_target_groups(model, targets).values() for name in names)


def detect_lora_targets(peft_model: PeftModel) -> str:
    """Which target set a loaded adapter covers (``official``/``attention``), or ``custom``.

    A resumed adapter keeps its own modules whatever ``--lora_targets`` says, so the recorded set is
    read from the adapter rather than from the flag.
    """
    base = peft_model.get_base_model()
    # the modules actually wrapped: peft may store a long target list as shorter suffixes
    covered = {name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)}
    for targets in LORA_TARGET_SETS:
        if covered == set(lora_target_modules(base, targets)):
            return targets
    return "custom"


def add_lora(model: AnyText2Model, rank: int, alpha: float, dropout: float = 0.0,
             targets: str = DEFAULT_LORA_TARGETS) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters on the ``targets`` set; every base parameter is frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(model, targets),
                        bias="none")
    return get_peft_model(model, config)


def lora_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable LoRA parameters by part: ``unet`` (without AttnX), ``unet_attnx``, ``writenet``, ``total``.

    AttnX (AnyText2's extra attention pair in the UNet's middle and decoder) has no counterpart in SD1.5,
    so it is counted apart to compare ``unet`` with the diffusers LCM-LoRA SD1.5 count.
    """
    counts = {"unet": 0, "unet_attnx": 0, "writenet": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad or ".lora_" not in name:
            continue
        dotted = f".{name}"
        if ".diffusion_model." in dotted:
            counts["unet_attnx" if (".attn1x." in name or ".attn2x." in name) else "unet"] += param.numel()
        elif ".control_model." in dotted:
            counts["writenet"] += param.numel()
        else:
            raise ValueError(f"LoRA parameter {name} is outside the UNet and the WriteNet")
    counts["total"] = sum(counts.values())
    return counts


def load_lora(model: AnyText2Model, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    """Apply a saved adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), after
    :func:`check_adapter` found that it fits the model (so a wrong adapter never loads silently)."""
    check_adapter(model, adapter_dir)
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
