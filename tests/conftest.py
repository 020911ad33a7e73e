"""Shared fixtures: the tiny random-init teacher and repository paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = REPO_ROOT / "models_yaml" / "anytext2_tiny.yaml"
FULL_YAML = REPO_ROOT / "models_yaml" / "anytext2_sd15.yaml"
GOLDEN_DIR = REPO_ROOT / "tests" / "data" / "golden"


@pytest.fixture(scope="session")
def tiny_teacher():
    """The tiny teacher built with the init rule (shared: tests must not modify it)."""
    from student_model_v2.anytext2.checkpoint import build_random_teacher

    torch.manual_seed(0)
    return build_random_teacher(TINY_YAML)
