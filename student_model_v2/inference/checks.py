"""Checks of the numbers, paths and adapters a user gives, shared by the CLI, the demo and the evaluation.

Each runs before the model is built and raises :class:`InferenceInputError` with a one-line message that
starts with the flag (or widget) name, so a bad value costs seconds, not a model load, and a run is never
lost at its end (the output path is checked before sampling).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..anytext2.config import ConfigError, ModelConfig
from ..distillation.adapter_check import AdapterError, AdapterFolder, check_adapter
from ..distillation.adapter_info import DEFAULT_LCM_GRID, AdapterInfo, training_grid
from .inputs import SIZE_MULTIPLE, InferenceInputError

MAX_TEACHER_STEPS = 1000  # the DDPM schedule's length: DDIM cannot take more steps than it has timesteps
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_OUTPUT_NAME = "sample.png"


def check_steps(name: str, steps: int, teacher: bool, grid: int = DEFAULT_LCM_GRID) -> None:
    """Student (LCM) steps lie in 1..``grid`` (LCM picks its timesteps from the training grid); teacher
    (DDIM) steps in 1..1000."""
    if teacher:
        if not 1 <= steps <= MAX_TEACHER_STEPS:
            raise InferenceInputError(f"{name} {steps}: the teacher's DDIM takes 1 to {MAX_TEACHER_STEPS} steps")
    elif not 1 <= steps <= grid:
        raise InferenceInputError(f"{name} {steps}: the student takes 1 to {grid} LCM steps (the solver grid its "
                                  "adapter was trained on); 4 to 8 is its range")


def check_student_steps(name: str, steps: int | None, info: AdapterInfo | None) -> None:
    """An explicit LCM/TCD step count within the adapter's training grid (a PCM adapter's count is its
    phase count, which the sampler plan checks)."""
    if steps is not None and not (info is not None and info.objective == "pcm"):
        check_steps(name, steps, teacher=False, grid=training_grid(info))


def check_size(name: str, value: int) -> None:
    """Image sides are positive multiples of 64 (the UNet halves the latent three times)."""
    if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
        raise InferenceInputError(f"{name} {value}: must be a positive multiple of {SIZE_MULTIPLE} (64, 128, ..., 512)")


def resolve_output_path(name: str, value: str | os.PathLike[str]) -> Path:
    """The image file to write: a folder gets ``sample.png`` inside it; the extension must be an image
    format and the folder must exist and take a file (tried, not guessed from permission bits)."""
    path = Path(value).expanduser()
    if path.is_dir() or str(value).endswith(("/", os.sep)):
        path = path / DEFAULT_OUTPUT_NAME
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InferenceInputError(f"{name} {value}: {path.suffix or 'no extension'} is not an image file extension; "
                                  f"use one of {', '.join(IMAGE_SUFFIXES)}")
    folder = path.parent
    if not folder.exists():
        raise InferenceInputError(f"{name} {value}: the folder {folder} does not exist (create it first)")
    if not folder.is_dir():
        raise InferenceInputError(f"{name} {value}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InferenceInputError(f"{name} {value}: cannot write in {folder} ({exc.strerror or exc})") from exc
    return path


def check_adapter_flag(name: str, model_config: ModelConfig | str | os.PathLike[str],
                       folder: str | os.PathLike[str]) -> AdapterFolder:
    """:func:`~student_model_v2.distillation.adapter_check.check_adapter` (header and config only, model skeleton on
    the ``meta`` device) with the flag's name in front of its message."""
    try:
        return check_adapter(model_config, folder)
    except (AdapterError, ConfigError, FileNotFoundError) as exc:
        raise InferenceInputError(f"{name} {exc}") from exc
