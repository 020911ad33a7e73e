"""Reading and checking a saved LoRA adapter folder against a model before any weight is loaded.

``PeftModel.from_pretrained`` alone only warns about missing adapter keys (and the "student" is then the
base model) or prints one size-mismatch line per tensor after the model load. Here the folder's config,
tensor shapes (safetensors header only) and training record are compared with the LoRA tensors peft would
create on a ``meta``-device skeleton of the model, and any difference is one clear error.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import SafetensorError, safe_open

from ..anytext2.config import ModelConfig, load_model_config
from ..anytext2.model import AnyText2Model
from .adapter_info import AdapterInfo, AdapterInfoError

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_SHOWN = 3


class AdapterError(ValueError):
    """An adapter folder that cannot be used: missing, not a LoRA adapter folder, or unreadable."""


class AdapterMismatchError(AdapterError):
    """A LoRA adapter made for another model: its target modules, tensor names or shapes do not fit."""


@dataclass(frozen=True)
class AdapterFolder:
    """A saved adapter read without its weights: the LoRA config, every tensor's shape (from the file
    header) and what it was trained for (None when the folder has no ``distillation.json``)."""

    path: Path
    config: LoraConfig
    shapes: dict[str, tuple[int, ...]]
    info: AdapterInfo | None

    def trained_for(self) -> str:
        """What the adapter was trained on, for error messages."""
        if self.info is None:
            base = self.config.base_model_name_or_path
            return ("no distillation.json (an adapter from before it was recorded, or not from this toolkit's "
                    f"trainer{'; adapter_config.json names base model ' + repr(base) if base else ''})")
        info = self.info
        phases = f", {info.num_phases} phases" if info.num_phases else ""
        return (f"trained by {info.version} for {info.objective} on a {info.num_inference_steps}-step grid{phases}, "
                f"LoRA targets {info.lora_targets!r}, rank {info.lora_rank}")


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape; a safetensors file is read from its header only."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{path}: unreadable safetensors file ({exc})") from exc
    try:  # adapter_model.bin, as older peft versions saved it
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise AdapterError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise AdapterError(f"{path}: does not hold a state dict of tensors")
    return {key: tuple(value.shape) for key, value in state.items()}


def read_adapter(folder: str | os.PathLike[str]) -> AdapterFolder:
    """The adapter folder's config, tensor shapes and training record, without loading any weights."""
    folder = Path(folder)
    if not folder.exists():
        raise AdapterError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise AdapterError(f"{folder}: is a file, not an adapter folder")
    config_path = folder / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG_FILE})")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_path}: unreadable ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else None
        raise AdapterError(f"{config_path}: a {kind or 'non-peft'} adapter, not a LoRA adapter")
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{config_path}: not a valid LoRA config ({exc})") from exc
    weights = [folder / name for name in ADAPTER_WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise AdapterError(f"{folder}: has {ADAPTER_CONFIG_FILE} but no weights ({' or '.join(ADAPTER_WEIGHT_FILES)})")
    try:
        info = AdapterInfo.load(folder)
    except AdapterInfoError as exc:
        raise AdapterError(str(exc)) from exc
    return AdapterFolder(folder, config, _weight_shapes(weights[0]), info)


def _short(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _first(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")


_EXPECTED: dict[tuple[str, str], tuple[dict[str, tuple[int, ...]], list[str]]] = {}
_EXPECTED_KEPT = 8


def expected_lora_shapes(model_config: ModelConfig, lora_config: LoraConfig) -> tuple[dict[str, tuple[int, ...]],
                                                                                      list[str]]:
    """(tensor name -> shape that peft would create for ``lora_config`` on this model, the listed target
    modules no module of the model matches). Remembered per (model config, LoRA config): a CLI checks the
    adapter at start-up and again when it applies it, and the answer cannot differ."""
    key = (repr(model_config), json.dumps(lora_config.to_dict(), sort_keys=True, default=str))
    if key not in _EXPECTED:
        if len(_EXPECTED) >= _EXPECTED_KEPT:
            _EXPECTED.pop(next(iter(_EXPECTED)))
        _EXPECTED[key] = _peft_lora_shapes(model_config, lora_config)
    shapes, unmatched = _EXPECTED[key]
    return dict(shapes), list(unmatched)


def _peft_lora_shapes(model_config: ModelConfig, lora_config: LoraConfig) -> tuple[dict[str, tuple[int, ...]],
                                                                                 list[str]]:
    """:func:`expected_lora_shapes`, computed on the ``meta`` device: no memory, about two seconds for SD1.5."""
    with torch.device("meta"):
        skeleton = AnyText2Model(model_config)
    names = [name for name, _ in skeleton.named_modules() if name]
    matched = [name for name in names if check_target_module_exists(lora_config, name)]
    targets = lora_config.target_modules
    unmatched = []
    if isinstance(targets, (list, set, tuple, frozenset)):
        unmatched = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in matched))
    if not matched:
        return {}, unmatched
    try:
        peft_model = get_peft_model(skeleton, copy.deepcopy(lora_config))
    except ValueError as exc:  # a target name that selects a layer LoRA cannot wrap in this model (e.g. an Identity)
        raise AdapterMismatchError(f"its target modules select layers of this model that LoRA cannot wrap ({exc})") from exc
    state = get_peft_model_state_dict(peft_model)
    return {key: tuple(value.shape) for key, value in state.items()}, unmatched


def check_adapter(model: AnyText2Model | ModelConfig | str | os.PathLike[str],
                  folder: str | os.PathLike[str]) -> AdapterFolder:
    """Compare an adapter folder with the model (a built model, its config, or the model YAML) before any
    weight is loaded: every LoRA tensor the adapter's config creates on this model must be in the file with
    the same shape, and nothing else. Raises one :class:`AdapterMismatchError` with counts, the first
    names and what the adapter was trained for; ``PeftModel.from_pretrained`` would only warn about
    missing keys (and sample the base model) or print a size mismatch per tensor after the model load."""
    adapter = read_adapter(folder)
    if isinstance(model, AnyText2Model):
        model_config = model.config
    elif isinstance(model, ModelConfig):
        model_config = model
    else:
        model_config = load_model_config(model)
    try:
        expected, unmatched = expected_lora_shapes(model_config, adapter.config)
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"{adapter.path} does not fit this model: {exc}. "
                                   f"Adapter: {adapter.trained_for()}") from exc
    missing = sorted(_short(k) for k in expected.keys() - adapter.shapes.keys())
    unexpected = sorted(_short(k) for k in adapter.shapes.keys() - expected.keys())
    mismatched = sorted(k for k in expected.keys() & adapter.shapes.keys() if expected[k] != adapter.shapes[k])
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} of its target modules are not in the model (first: {_first(unmatched)})")
    if not expected:
        problems.append("its target modules match no module of the model")
    if missing:
        problems.append(f"{len(missing)} LoRA tensors missing from the file (first: {_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected LoRA tensors (first: {_first(unexpected)})")
    if mismatched:
        shown = [f"{_short(k)} is {list(adapter.shapes[k])}, the model needs {list(expected[k])}"
                 for k in mismatched[:_SHOWN]]
        problems.append(f"{len(mismatched)} LoRA tensors with other shapes (first: {'; '.join(shown)})")
    if problems:
        raise AdapterMismatchError(f"{adapter.path} does not fit this model: {'; '.join(problems)}. "
                                   f"Adapter: {adapter.trained_for()}")
    return adapter
