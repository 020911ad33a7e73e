"""What a student adapter was trained for, recorded next to its weights.

A peft folder only says which modules carry LoRA. Sampling an adapter correctly also needs the
training objective (an LCM student maps any x_t to x_0; a phased-consistency student only jumps to
its phase edges), the solver grid it was trained on (the most steps it can serve) and the LoRA target
set. The trainer writes ``distillation.json`` into every checkpoint folder; inference and evaluation
read it instead of assuming the defaults. Folders written before this file existed read as ``None``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

ADAPTER_INFO_FILE = "distillation.json"
# The solver grid of adapters without the file: written before it existed, or a foreign LCM-LoRA such as
# lcm-lora-sdv1-5 (LCMScheduler's own default, the grid those were trained on).
DEFAULT_LCM_GRID = 50
Objective = Literal["lcm", "pcm", "x0_regression"]
OBJECTIVES: tuple[str, ...] = ("lcm", "pcm", "x0_regression")


class AdapterInfoError(ValueError):
    """A ``distillation.json`` that cannot be read; the message names the file."""


@dataclass(frozen=True)
class AdapterInfo:
    """The training facts a sampler needs about an adapter.

    ``num_inference_steps`` is the DDIM solver grid N of the training run (timesteps ``(i+1)*(1000//N)-1``);
    ``num_phases`` is set for phased-consistency (``pcm``) adapters only.
    """

    version: str
    objective: Objective
    num_inference_steps: int
    lora_targets: str
    lora_rank: int
    lora_alpha: float
    num_phases: int | None = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise AdapterInfoError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.num_inference_steps < 1:
            raise AdapterInfoError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if (self.objective == "pcm") != (self.num_phases is not None):
            raise AdapterInfoError("num_phases is recorded for pcm adapters and only for them")

    def save(self, folder: str | Path) -> Path:
        """Write the file into ``folder`` (flushed to disk: it is part of an atomic checkpoint)."""
        path = Path(folder) / ADAPTER_INFO_FILE
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> AdapterInfo | None:
        """The recorded info, or None when the folder predates the file (or is a foreign peft adapter)."""
        path = Path(folder) / ADAPTER_INFO_FILE
        if not path.is_file():
            return None
        try:
            raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AdapterInfoError(f"{path}: unreadable ({error})") from error
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        missing = sorted(f.name for f in fields(cls) if f.name not in raw and f.default is not None)
        if unknown or missing:
            raise AdapterInfoError(f"{path}: unknown keys {unknown}, missing keys {missing}")
        try:
            return cls(**raw)
        except AdapterInfoError as error:
            raise AdapterInfoError(f"{path}: {error}") from error


def training_grid(info: AdapterInfo | None) -> int:
    """The solver grid N an adapter was trained on: its LCM timesteps come from it, and it bounds the steps."""
    return info.num_inference_steps if info is not None else DEFAULT_LCM_GRID
