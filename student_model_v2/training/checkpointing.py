"""Checkpoint folders: a peft adapter plus everything needed to continue training exactly.

``checkpoint-<step>/`` (also ``checkpoint-epoch-<n>/`` and ``checkpoint-final/``) holds
``adapter_config.json`` + ``adapter_model.safetensors`` (loadable with ``PeftModel.from_pretrained``),
``distillation.json`` (objective, solver grid and LoRA targets: :mod:`..distillation.adapter_info`)
and ``training_state.pt`` (optimizer, LR schedule, step, epoch, data position, RNG states of every
rank). A folder is written under a temporary name and renamed when complete, so an interrupted save
never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from ..distillation.adapter_info import AdapterInfo

STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


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


def save_checkpoint(folder: Path, peft_model: PeftModel, training_state: dict[str, Any], info: AdapterInfo) -> Path:
    """Write adapter + its training info + state atomically into ``folder`` (replacing an older one)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    peft_model.save_pretrained(str(tmp))
    info.save(tmp)
    torch.save(training_state, tmp / STATE_FILE)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    return folder


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete ``checkpoint-<step>`` folder with the highest step, if any."""
    best: tuple[int, Path] | None = None
    for child in Path(output_dir).glob("checkpoint-*"):
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file() and (best is None or int(match.group(1)) > best[0]):
            best = (int(match.group(1)), child)
    return None if best is None else best[1]


def load_training_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {STATE_FILE}; resume it without --resume_optimizer to reuse only the adapter")
    return torch.load(path, map_location="cpu", weights_only=False)
