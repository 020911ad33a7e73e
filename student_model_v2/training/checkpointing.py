"""Checkpoint folders: a peft adapter plus everything needed to continue training exactly.

``checkpoint-<step>/`` (also ``checkpoint-epoch-<n>/`` and ``checkpoint-final/``) holds
``adapter_config.json`` + ``adapter_model.safetensors`` (loadable with ``PeftModel.from_pretrained``),
``distillation.json`` (objective, solver grid and LoRA targets: :mod:`..distillation.adapter_info`),
``training_state.pt`` (optimizer, LR schedule, grad scaler, step, epoch, data position, RNG states and
data-issue counts of every rank) and ``trainer_state.json`` (step, epoch, world size: what ``latest``
ranks folders by, without loading optimizer states).

Writes survive a crash at any moment: the new folder is written as ``<name>.tmp`` with every file
fsynced and ``trainer_state.json`` last (its presence marks the folder complete); then ``<name>`` is
renamed to ``<name>.old``, ``<name>.tmp`` to ``<name>``, and ``<name>.old`` is deleted. At every moment
one complete copy exists under one of the three names, and :func:`recover_folder` settles whatever an
interrupted save left behind before anything is read.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from ..distillation.adapter_info import AdapterInfo

STATE_FILE = "training_state.pt"
SUMMARY_FILE = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(?:(?P<step>\d+)|epoch-(?P<epoch>\d+)|(?P<final>final))$")
logger = logging.getLogger("student_model_v2.train")


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint would have stored NaN/Inf weights or optimizer state; nothing was written."""


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """This process's random state: the training generator plus the global RNGs."""
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _floating_tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floating_tensors(item, f"{prefix}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _floating_tensors(item, f"{prefix}[{index}]")


def nonfinite_entries(parameters: Iterable[tuple[str, torch.Tensor]], optimizer_state: dict[str, Any]) -> list[str]:
    """Names of weights and optimizer-state tensors holding NaN or Inf (empty when all are finite)."""
    bad = [name for name, tensor in parameters if not bool(torch.isfinite(tensor.detach()).all())]
    bad += [name for name, tensor in _floating_tensors(optimizer_state.get("state", {}), "optimizer")
            if not bool(torch.isfinite(tensor).all())]
    return bad


def check_finite(parameters: Iterable[tuple[str, torch.Tensor]], optimizer_state: dict[str, Any], folder: Path) -> None:
    """Refuse to checkpoint non-finite training state: a NaN checkpoint would silently poison a resume."""
    bad = nonfinite_entries(parameters, optimizer_state)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteCheckpointError(f"refusing to write {folder}: non-finite values in {shown}; the previous "
                                       "checkpoints are untouched (see docs/training.md, non-finite guard)")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _is_complete(folder: Path) -> bool:
    return (folder / SUMMARY_FILE).is_file() and (folder / STATE_FILE).is_file()


def recover_folder(folder: Path) -> None:
    """Settle what an interrupted :func:`save_checkpoint` of ``folder`` left (``.tmp`` / ``.old`` siblings).

    A complete ``.tmp`` is the newest state and is promoted (crash after writing it, before or between
    the renames); an incomplete one is deleted. A lone ``.old`` (crash between the renames without a
    usable ``.tmp``) takes the name back; an ``.old`` next to the name is deleted.
    """
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if tmp.is_dir():
        if _is_complete(tmp):
            if folder.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(folder, old)
            os.replace(tmp, folder)
            logger.warning("recovered %s from a complete %s left by an interrupted save", folder, tmp.name)
        else:
            shutil.rmtree(tmp)
            logger.warning("deleted %s: an interrupted save left it incomplete", tmp)
    if old.is_dir():
        if folder.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, folder)
            logger.warning("recovered %s from %s left by an interrupted save", folder, old.name)
    if folder.parent.is_dir():
        _fsync_dir(folder.parent)


def recover_checkpoints(output_dir: Path) -> None:
    """:func:`recover_folder` for every checkpoint an interrupted save left ``.tmp``/``.old`` traces of."""
    bases = {child.with_suffix("") for child in Path(output_dir).glob("checkpoint-*")
             if child.suffix in (".tmp", ".old") and child.is_dir()}
    for base in sorted(bases):
        recover_folder(base)


def save_checkpoint(folder: Path, peft_model: PeftModel, training_state: dict[str, Any], info: AdapterInfo) -> Path:
    """Write adapter + its training info + state into ``folder``, durable and atomic (module docstring)."""
    folder = Path(folder)
    check_finite(((n, p) for n, p in peft_model.named_parameters() if p.requires_grad),
                 training_state.get("optimizer", {}), folder)
    recover_folder(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    peft_model.save_pretrained(str(tmp))
    info.save(tmp)
    torch.save(training_state, tmp / STATE_FILE)
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    summary = {key: training_state[key] for key in ("global_step", "epoch", "batches_done", "num_processes")}
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    _fsync_file(tmp / SUMMARY_FILE)
    _fsync_dir(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    if old.exists():
        shutil.rmtree(old)
    return folder


def checkpoint_step(folder: Path) -> int:
    """The ``global_step`` a complete checkpoint folder was written at."""
    summary = Path(folder) / SUMMARY_FILE
    if summary.is_file():
        return int(json.loads(summary.read_text())["global_step"])
    return int(load_training_state(folder)["global_step"])  # folders written before trainer_state.json


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest ``global_step`` among ``checkpoint-<step>``, ``-epoch-<n>`` and ``-final``.

    Folders are ranked by the step in their state, not by name, so a finished run resumes from
    ``checkpoint-final``; at equal steps final wins over epoch over step folders (same state).
    """
    ranked: list[tuple[int, int, Path]] = []
    for child in Path(output_dir).glob("checkpoint-*"):
        match = _CHECKPOINT_DIR.match(child.name)
        if match is None or not (child / STATE_FILE).is_file():
            continue
        kind = 2 if match.group("final") else 1 if match.group("epoch") else 0
        ranked.append((checkpoint_step(child), kind, child))
    return max(ranked)[2] if ranked else None


def load_training_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {STATE_FILE}; resume it without --resume_optimizer to reuse only the adapter")
    return torch.load(path, map_location="cpu", weights_only=False)
