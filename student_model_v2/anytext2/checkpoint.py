"""Build the teacher from a YAML, load checkpoints strictly, save them atomically.

Two ways to get a teacher: from the released ``anytext_v2.0.ckpt`` (strict key check, the model is
built on the ``meta`` device and takes the checkpoint's tensors, so no memory goes to a random init),
or from the deterministic init rule (tiny config for tests and demos; the full config for GPU
benchmarks without weights). A rule-initialised teacher is random and says so loudly.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import load_model_config
from .init_rule import apply_init_rule
from .model import AnyText2Model
from .schedule import SCHEDULE_BUFFER_NAMES, make_schedule_buffers

logger = logging.getLogger(__name__)

# The --dtype / --teacher_dtype names every command line accepts for the teacher weights.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIONAL_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
RANDOM_INIT_BANNER = (
    "RANDOM-INIT TEACHER: built from the deterministic init rule, not from trained weights. "
    "Its outputs are noise-like and say nothing about AnyText2 quality."
)


class CheckpointError(RuntimeError):
    """A file that is not a loadable AnyText2 checkpoint, or one whose keys do not match the model."""


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read ``.safetensors`` / ``.ckpt`` / ``.pt`` / ``.pth`` on the CPU, unwrapping ``state_dict``.

    Pickled checkpoints are read with ``weights_only=True`` and memory-mapped when their format allows;
    ``trust_pickle`` lifts the restriction for old Lightning checkpoints that pickle other objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        state = _torch_load(path, trust_pickle)
    for _ in range(2):
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return dict(state)


def _torch_load(path: Path, trust_pickle: bool) -> object:
    use_mmap = zipfile.is_zipfile(path)
    if not use_mmap:
        with open(path, "rb") as handle:
            if handle.read(1) != b"\x80":
                raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        if not trust_pickle and "weights_only" in str(exc):
            raise CheckpointError(
                f"{path}: the checkpoint pickles objects other than tensors; if you trust its source, "
                "load it with trust_pickle=True (--trust_checkpoint on the command line)"
            ) from exc
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({exc})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({exc})") from exc


def _prefixes(keys: list[str], depth: int = 2) -> list[str]:
    return sorted({".".join(k.split(".")[:depth]) for k in keys})


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected or mis-shaped keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items() if k not in OPTIONAL_KEYS}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, first {missing[:5]} (prefixes {_prefixes(missing)[:8]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, first {unexpected[:5]} (prefixes {_prefixes(unexpected)[:8]})")
    if mismatched:
        detail = [f"{k}: model {expected[k]} vs file {given[k]}" for k in mismatched[:5]]
        problems.append(f"{len(mismatched)} keys with other shapes, first {detail}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(problems))


def _finish(model: AnyText2Model, dtype: torch.dtype | None, device: str | torch.device) -> AnyText2Model:
    """Cast weights (the schedule buffers stay fp32), move, freeze BN statistics via eval mode."""
    if dtype is not None:
        for name, module in model.named_modules():
            for key, param in list(module.named_parameters(recurse=False)):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
            for key, buf in list(module.named_buffers(recurse=False)):
                if buf.is_floating_point() and not (name == "" and key in SCHEDULE_BUFFER_NAMES):
                    module._buffers[key] = buf.to(dtype)
    return model.to(device).eval()


def _restore_position_ids(model: AnyText2Model) -> None:
    """CLIP's ``position_ids`` is non-persistent: a meta-built model must recreate it."""
    embeddings = model.cond_stage_model.transformer.text_model.embeddings
    length = embeddings.position_embedding.weight.shape[0]
    embeddings.register_buffer("position_ids", torch.arange(length).unsqueeze(0), persistent=False)


def load_teacher(
    config_path: str | Path,
    checkpoint_path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_pickle: bool = False,
) -> AnyText2Model:
    """Build the model described by ``config_path`` and load ``checkpoint_path`` strictly."""
    config = load_model_config(config_path)
    state = read_state_dict(checkpoint_path, trust_pickle)
    with torch.device("meta"):
        model = AnyText2Model(config)
    check_state_dict(model, state, str(checkpoint_path))
    state = {k: v for k, v in state.items() if k not in OPTIONAL_KEYS}
    model.load_state_dict(state, strict=True, assign=True)
    _restore_position_ids(model)
    return _finish(model, dtype, device)


def build_random_teacher(
    config_path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> AnyText2Model:
    """Build the model from its YAML with the deterministic init rule (no checkpoint)."""
    config = load_model_config(config_path)
    with torch.device("meta"):
        model = AnyText2Model(config)
    model.to_empty(device="cpu")
    _restore_position_ids(model)
    with torch.device("cpu"):
        schedule = make_schedule_buffers(config.linear_start, config.linear_end, config.timesteps)
    for name, value in schedule.items():
        setattr(model, name, value)
    model.eval()
    apply_init_rule(model)
    _zero_integer_buffers(model)
    model.is_random_init = True
    logger.warning(RANDOM_INIT_BANNER)
    return _finish(model, dtype, device)


def _zero_integer_buffers(model: torch.nn.Module) -> None:
    """``to_empty`` leaves integer buffers (BN ``num_batches_tracked``) uninitialised."""
    for module in model.modules():
        for key, buf in module.named_buffers(recurse=False):
            if not buf.is_floating_point() and key != "position_ids":
                buf.zero_()


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict atomically (temp file + rename): a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        if path.suffix == ".safetensors":
            save_file(tensors, tmp_name)
        else:
            torch.save(tensors, tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return path
