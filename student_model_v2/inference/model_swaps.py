"""AnyText2's two optional model swaps: another SD1.5 base model, and community LoRAs merged in.

AnyText2's demo restyles the teacher by loading another SD1.5 checkpoint's UNet and text encoder over
it ("Base Model Path") and by merging community SD1.5 LoRAs into those weights with a ratio ("LoRA Path
and Ratio"). What AnyText2 added (AttnX, WriteNet, embedding manager, OCR) and the VAE stay as they are:
a plain SD1.5 checkpoint has no AttnX keys, and only the two prefixes below are taken from it.

Both swaps change weights in place, and a merged LoRA cannot be taken out again exactly, so a pipeline
whose swaps change rebuilds its teacher from a :class:`ModelRecipe` (:func:`load_swapped_teacher`) and
re-applies its student LoRA afterwards, as the original did after every reload.

Community LoRAs name layers the diffusers way (kohya/A1111 files with the dots turned into
underscores). :class:`LayerNames` translates between those names and the checkpoint's LDM names with
one table that diffusers' single-file converter (``convert_ldm_unet_checkpoint``) gives for the UNet
config, read in either direction, so every ``num_res_blocks`` and ``channel_mult`` works. Kohya names are
made from that table (:func:`kohya_name`, dots to underscores) rather than parsed with diffusers'
``lora_conversion_utils._convert_non_diffusers_lora_to_diffusers``: that function is private, rewrites
kohya keys to diffusers keys by string rules for the SD1.5/SDXL layouts only, and would still need this
table to reach the checkpoint names; generating the kohya name of every layer the model has is exact for
any layout and lets a key the model lacks be named in the error.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from torch import nn

from ..anytext2.checkpoint import OPTIONAL_KEYS, CheckpointError, build_random_teacher, load_teacher, read_state_dict
from ..anytext2.config import ConfigError
from ..anytext2.model import AnyText2Model
from ..anytext2.unet import ControlledUnetModel
from .inputs import InferenceInputError

UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
BASE_MODEL_PREFIXES = (UNET_PREFIX, TEXT_ENCODER_PREFIX)
DIFFUSERS_UNET_PREFIX = "unet."
DIFFUSERS_TEXT_ENCODER_PREFIX = "text_encoder.text_model."
KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_ENCODER_PREFIX = "lora_te_"
ATTNX_MARKERS = (".attn1x.", ".attn2x.")
LORA_EXAMPLE = "/a/lora1.safetensors 0.8 /b/lora2.safetensors 0.5"

# the role of each key suffix of a LoRA file, kohya first (after the first dot), then diffusers/peft
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
                       "lora.up.weight": "up", "alpha": "alpha"}
_SHOWN = 5


class ModelSwapError(InferenceInputError):
    """A base model or community LoRA that cannot be applied to this teacher; the message names the file."""


# --------------------------------------------------------------------------------------------------
# diffusers <-> LDM layer names

def _unet_name_pairs(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """LDM module name -> diffusers module name of every UNet module that holds parameters, as diffusers'
    own single-file loader renames an LDM checkpoint (``convert_ldm_unet_checkpoint``).

    The converter maps whole state dicts in one direction (LDM -> diffusers) and infers the block layout
    from the keys, so it is run once on this UNet's state dict built on the ``meta`` device (no memory),
    and each tensor it returns is traced back to its input key: that gives the name table in both
    directions for any ``num_res_blocks`` / ``channel_mult``. AnyText2's AttnX layers pass through it
    with their names kept inside the renamed attention blocks.
    """
    with torch.device("meta"):
        unet = ControlledUnetModel(dict(unet_config))
    state = {UNET_PREFIX + key: value for key, value in unet.state_dict().items()}
    # the only config entries the converter reads: SD1.5-style UNets have no class or addition embeddings
    config = {"layers_per_block": int(unet_config["num_res_blocks"]), "class_embed_type": None,
              "addition_embed_type": None, "num_class_embeds": None}
    converted = convert_ldm_unet_checkpoint(state, config)
    source = {id(value): key[len(UNET_PREFIX):] for key, value in state.items()}
    pairs: dict[str, str] = {}
    for key, value in converted.items():
        ldm_module, _, suffix = source[id(value)].rpartition(".")
        diffusers_module, _, diffusers_suffix = key.rpartition(".")
        if suffix != diffusers_suffix:
            raise ConfigError(f"diffusers renames the UNet parameter {ldm_module}.{suffix} to {key}: not a module "
                              "rename, so this UNet config has no LDM <-> diffusers name table")
        pairs[ldm_module] = diffusers_module
    return pairs


class LayerNames:
    """Module names of one UNet config in diffusers and in LDM (checkpoint) form (see :func:`_unet_name_pairs`).

    Full names on both sides: ``unet.down_blocks.0.attentions.0.proj_in`` <->
    ``model.diffusion_model.input_blocks.1.1.proj_in``, and ``text_encoder.text_model.X`` <->
    ``cond_stage_model.transformer.text_model.X``. A parameter suffix (``.weight``) passes through.
    """

    def __init__(self, unet_config: Mapping[str, Any]) -> None:
        self._to_diffusers = _unet_name_pairs(unet_config)
        self._to_ldm = {diffusers: ldm for ldm, diffusers in self._to_diffusers.items()}

    def to_ldm(self, name: str) -> str | None:
        """The checkpoint name of a diffusers name, or None when this UNet has no such layer."""
        return self._translate(name, to_ldm=True)

    def to_diffusers(self, name: str) -> str | None:
        """The diffusers name of a checkpoint name, or None outside the UNet and the text encoder."""
        return self._translate(name, to_ldm=False)

    def _translate(self, name: str, to_ldm: bool) -> str | None:
        sides = ((DIFFUSERS_UNET_PREFIX, UNET_PREFIX), (DIFFUSERS_TEXT_ENCODER_PREFIX, TEXT_ENCODER_PREFIX))
        for diffusers_prefix, ldm_prefix in sides:
            source, target = (diffusers_prefix, ldm_prefix) if to_ldm else (ldm_prefix, diffusers_prefix)
            if not name.startswith(source):
                continue
            inner = name[len(source):]
            if ldm_prefix == TEXT_ENCODER_PREFIX:
                return target + inner
            table = self._to_ldm if to_ldm else self._to_diffusers
            module, _, suffix = inner.rpartition(".")
            if inner in table:
                return target + table[inner]
            return f"{target}{table[module]}.{suffix}" if module in table else None
        return None


def kohya_name(diffusers_name: str) -> str | None:
    """The kohya/A1111 module name of a diffusers module name (``lora_unet_down_blocks_0_…``), or None."""
    for diffusers_prefix, kohya_prefix in ((DIFFUSERS_UNET_PREFIX, KOHYA_UNET_PREFIX),
                                           ("text_encoder.", KOHYA_TEXT_ENCODER_PREFIX)):
        if diffusers_name.startswith(diffusers_prefix):
            return kohya_prefix + diffusers_name[len(diffusers_prefix):].replace(".", "_")
    return None


# --------------------------------------------------------------------------------------------------
# base model


@dataclass(frozen=True)
class BaseModelReport:
    """What a base-model swap did: tensors replaced, and the model's tensors under the two prefixes that
    the file lacks and so keep the AnyText2 weights (AttnX for a plain SD1.5 checkpoint)."""

    source: str
    replaced: int
    kept: tuple[str, ...]

    @property
    def kept_besides_attnx(self) -> tuple[str, ...]:
        return tuple(k for k in self.kept if not any(m in k for m in ATTNX_MARKERS))

    def summary(self) -> str:
        others = self.kept_besides_attnx
        attnx = len(self.kept) - len(others)
        text = (f"base model {self.source}: {self.replaced} UNet and text-encoder tensors replaced, "
                f"{attnx} AttnX tensors kept")
        if others:
            text += (f"; {len(others)} other tensors are not in the file and keep the AnyText2 weights, "
                     f"first {list(others[:3])}")
        return text


def _read(path: str | os.PathLike[str], what: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ModelSwapError(f"{what} {path} is a folder: give one .safetensors / .ckpt / .pt file "
                             "(diffusers folders are not supported)")
    if not path.is_file():
        raise ModelSwapError(f"{what} {path}: no such file")
    try:
        return read_state_dict(path, trust_pickle)
    except CheckpointError as exc:
        raise ModelSwapError(f"{what}: {exc}") from exc


def base_model_weights(path: str | os.PathLike[str], trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The UNet and text-encoder tensors of an SD1.5 checkpoint in LDM format (VAE, EMA and the rest dropped)."""
    state = _read(path, "base model", trust_pickle)
    weights = {k: v for k, v in state.items() if k.startswith(BASE_MODEL_PREFIXES) and k not in OPTIONAL_KEYS}
    if not weights:
        raise ModelSwapError(f"base model {path}: no {UNET_PREFIX}* or {TEXT_ENCODER_PREFIX}* keys, so it is not an "
                             "SD1.5 checkpoint in LDM format (SD2's OpenCLIP, SDXL and diffusers files are not)")
    return weights


def apply_base_model(model: nn.Module, weights: Mapping[str, torch.Tensor],
                     source: str = "base model") -> BaseModelReport:
    """Copy ``weights`` into ``model`` (a teacher without adapters), all checked before any is copied.

    A key the model lacks or a shape that differs means the file was made for another architecture
    (SD2, SDXL, another config), and nothing is copied.
    """
    targets = {k: v for k, v in model.state_dict().items() if k.startswith(BASE_MODEL_PREFIXES)}
    unknown = sorted(k for k in weights if k not in targets)
    if unknown:
        raise ModelSwapError(f"{source}: {len(unknown)} keys are not in this model, first {unknown[:_SHOWN]}: the "
                             "file is not shaped like this model's SD1.5 UNet and text encoder (SD2, SDXL or another "
                             "config?)")
    mismatched = [f"{k}: file {tuple(weights[k].shape)} vs model {tuple(targets[k].shape)}"
                  for k in sorted(weights) if weights[k].shape != targets[k].shape]
    if mismatched:
        raise ModelSwapError(f"{source}: {len(mismatched)} tensors have other shapes, first {mismatched[:_SHOWN]}: the "
                             "file is not shaped like this model's SD1.5 UNet and text encoder (SD2, SDXL or another "
                             "config?)")
    with torch.no_grad():
        for key, value in weights.items():
            targets[key].copy_(value)
    return BaseModelReport(str(source), len(weights), tuple(sorted(set(targets) - set(weights))))


# --------------------------------------------------------------------------------------------------
# community LoRAs


@dataclass(frozen=True)
class LoraLayerUpdate:
    """One layer's low-rank update: ``W += ratio * scale * up @ down`` (``scale`` = alpha / rank)."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass(frozen=True)
class LoraMergeReport:
    """What merging one LoRA did: the checkpoint names of the layers it changed."""

    source: str
    ratio: float
    layers: tuple[str, ...]

    def summary(self) -> str:
        unet = sum(1 for name in self.layers if name.startswith(UNET_PREFIX))
        return (f"LoRA {self.source} x{self.ratio:g}: merged into {unet} UNet and {len(self.layers) - unet} "
                "text-encoder layers")


def mergeable_layers(model: nn.Module) -> dict[str, torch.Size]:
    """Weight shapes of the Linear and Conv2d layers a community LoRA may change (UNet and text encoder)."""
    return {name: module.weight.shape for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and name.startswith(BASE_MODEL_PREFIXES)}


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(format, module name, role) of a LoRA key, None when it is neither kohya nor diffusers/peft."""
    if key.startswith((KOHYA_UNET_PREFIX, KOHYA_TEXT_ENCODER_PREFIX)):
        module, _, suffix = key.partition(".")
        role = _KOHYA_SUFFIXES.get(suffix)
        return ("kohya", module, role) if role else None
    if key.startswith((DIFFUSERS_UNET_PREFIX, "text_encoder.")):
        for suffix, role in _DIFFUSERS_SUFFIXES.items():
            if key.endswith("." + suffix):
                return "diffusers", key[: -len(suffix) - 1], role
    return None


def _shape_problem(weight_shape: torch.Size, down: torch.Tensor, up: torch.Tensor) -> str | None:
    if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0] or any(n != 1 for n in up.shape[2:]):
        return f"down {tuple(down.shape)} and up {tuple(up.shape)} are not a low-rank pair"
    if up.shape[0] != weight_shape[0] or down[0].numel() != math.prod(weight_shape[1:]):
        return f"up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit the layer's weight {tuple(weight_shape)}"
    return None


def lora_updates(state: Mapping[str, torch.Tensor], layers: Mapping[str, torch.Size], names: LayerNames,
                 source: str = "file") -> list[LoraLayerUpdate]:
    """The layer updates a kohya or diffusers LoRA state dict describes, every key checked.

    ``layers`` are the model's :func:`mergeable_layers`. Any key that is not a LoRA weight of one of
    them (an unknown format, a layer this model lacks, a missing half, a shape that does not fit)
    refuses the whole file, naming the first few keys.
    """
    kohya: dict[str, str] = {}
    for name in layers:
        diffusers_name = names.to_diffusers(name)
        if diffusers_name is not None:
            kohya[kohya_name(diffusers_name)] = name
    parts: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in state.items():
        split = _split_key(key)
        if split is None:
            problems.append(f"{key} (not a kohya or diffusers LoRA key)")
            continue
        kind, module, role = split
        target = kohya.get(module) if kind == "kohya" else names.to_ldm(module)
        if target not in layers:
            problems.append(f"{key} (no such Linear/Conv2d layer in this model's SD1.5 UNet or text encoder)")
            continue
        parts.setdefault(target, {})[role] = tensor
    updates = []
    for module, pieces in parts.items():
        if "down" not in pieces or "up" not in pieces:
            problems.append(f"{module} (has {sorted(pieces)} but needs both the down and the up weight)")
            continue
        down, up = pieces["down"], pieces["up"]
        problem = _shape_problem(layers[module], down, up)
        if problem:
            problems.append(f"{module} ({problem})")
            continue
        alpha = float(pieces["alpha"]) if "alpha" in pieces else float(down.shape[0])
        updates.append(LoraLayerUpdate(module, down, up, alpha / down.shape[0]))
    if problems:
        raise ModelSwapError(f"LoRA {source}: cannot merge {len(problems)} of its entries, first {problems[:_SHOWN]}. "
                             "Supported: SD1.5 LoRAs in kohya/A1111 form (lora_unet_* / lora_te_* with lora_down, "
                             "lora_up, alpha) or diffusers form (unet.* / text_encoder.* with lora_A/lora_B or "
                             "lora.down/lora.up)")
    return updates


def merge_lora_updates(model: nn.Module, updates: Iterable[LoraLayerUpdate], ratio: float) -> None:
    """Fold updates into the weights, computed in fp32 and cast back to each weight's dtype."""
    with torch.no_grad():
        for update in updates:
            weight = model.get_submodule(update.module).weight
            rank = update.down.shape[0]
            up = update.up.to(weight.device, torch.float32).reshape(update.up.shape[0], rank)
            down = update.down.to(weight.device, torch.float32).reshape(rank, -1)
            delta = (up @ down).reshape(weight.shape)
            weight.copy_((weight.float() + (ratio * update.scale) * delta).to(weight.dtype))


def read_lora(path: str | os.PathLike[str], trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A community LoRA file's tensors (``.safetensors``, or a pickled ``.pt`` / ``.bin`` / ``.ckpt``)."""
    return _read(path, "LoRA", trust_pickle)


def merge_lora(model: AnyText2Model, state: Mapping[str, torch.Tensor], ratio: float,
               source: str = "file") -> LoraMergeReport:
    """Merge one community LoRA into ``model``'s UNet and text encoder (a teacher without adapters);
    a LoRA with any entry that does not fit changes nothing."""
    updates = lora_updates(state, mergeable_layers(model), LayerNames(model.config.unet), source)
    merge_lora_updates(model, updates, ratio)
    return LoraMergeReport(str(source), float(ratio), tuple(u.module for u in updates))


# --------------------------------------------------------------------------------------------------
# user input and the rebuild recipe


def _ratio(value: Any, path: str) -> float:
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ModelSwapError(f"the ratio {value!r} of LoRA {path} is not a number") from None
    if not math.isfinite(ratio):
        raise ModelSwapError(f"the ratio {value!r} of LoRA {path} is not a finite number")
    return ratio


def normalise_swaps(base_model_path: str | os.PathLike[str] | None,
                    community_loras: Iterable[tuple[str | os.PathLike[str], Any]]
                    ) -> tuple[str | None, tuple[tuple[str, float], ...]]:
    """Absolute paths and float ratios, so the same settings spelled differently compare equal; blank = none."""
    base = str(base_model_path).strip() if base_model_path is not None else ""
    loras = []
    for entry in community_loras:
        if len(entry) != 2:
            raise ModelSwapError(f"each community LoRA is a (path, ratio) pair, got {entry!r}")
        path, ratio = str(entry[0]).strip(), entry[1]
        if not path:
            raise ModelSwapError("a community LoRA path is empty")
        loras.append((os.path.abspath(os.path.expanduser(path)), _ratio(ratio, path)))
    return (os.path.abspath(os.path.expanduser(base)) if base else None), tuple(loras)


def parse_lora_list(text: str | None) -> list[tuple[str, float]]:
    """AnyText2's "LoRA Path and Ratio" box: ``path ratio`` pairs separated by spaces or new lines
    (shell quoting for paths with spaces); blank = none."""
    try:
        items = shlex.split(text or "")
    except ValueError as exc:
        raise ModelSwapError(f"LoRA Path and Ratio: {exc} (quote a path with spaces, e.g. '/my loras/a.safetensors' "
                             "0.8)") from exc
    if len(items) % 2:
        raise ModelSwapError(f"LoRA Path and Ratio takes 'path ratio' pairs, e.g. {LORA_EXAMPLE}; got {len(items)} "
                             f"items: {items}")
    return [(path, _ratio(ratio, path)) for path, ratio in zip(items[::2], items[1::2])]


def format_lora_list(loras: Sequence[tuple[str, float]]) -> str:
    """The inverse of :func:`parse_lora_list` (ratios written exactly, so the text reads back equal)."""
    return " ".join(f"{shlex.quote(path)} {float(ratio)!r}" for path, ratio in loras)


@dataclass(frozen=True)
class ModelRecipe:
    """How a pipeline's model was built, so that it can be built again with other swaps.

    ``teacher_ckpt`` None is the random init-rule teacher. The student LoRA fields record how the
    adapter was applied (merged or not) so a rebuild applies it the same way.
    """

    config: str
    teacher_ckpt: str | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    trust_checkpoint: bool = False
    base_model_path: str | None = None
    community_loras: tuple[tuple[str, float], ...] = ()
    lora_path: str | None = None
    lora_scale: float = 1.0
    lora_merged: bool = False


def load_swapped_teacher(recipe: ModelRecipe) -> tuple[AnyText2Model, list[str]]:
    """The recipe's teacher on the CPU with its base model and community LoRAs applied (no student LoRA),
    and one summary line per swap. The swap files are read first, so a missing or unreadable one is
    reported before the (slow) teacher load."""
    weights = base_model_weights(recipe.base_model_path, recipe.trust_checkpoint) if recipe.base_model_path else None
    loras = [(path, ratio, read_lora(path, recipe.trust_checkpoint)) for path, ratio in recipe.community_loras]
    try:
        if recipe.teacher_ckpt:
            model = load_teacher(recipe.config, recipe.teacher_ckpt, dtype=recipe.dtype, device="cpu",
                                 trust_pickle=recipe.trust_checkpoint)
        else:
            model = build_random_teacher(recipe.config, dtype=recipe.dtype, device="cpu")
    except (CheckpointError, ConfigError, FileNotFoundError) as exc:
        raise InferenceInputError(str(exc)) from exc
    notes = []
    if weights is not None:
        notes.append(apply_base_model(model, weights, recipe.base_model_path).summary())
    for path, ratio, state in loras:
        notes.append(merge_lora(model, state, ratio, path).summary())
    return model, notes
