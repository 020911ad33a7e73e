"""Shared fixtures: the tiny random-init teacher, a student adapter for it, and repository paths."""

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


@pytest.fixture(scope="session")
def student_lora_dir(tmp_path_factory):
    """A saved rank-4 student adapter for the tiny teacher whose B is non-zero, so it changes the images."""
    from student_model_v2.anytext2.checkpoint import build_random_teacher
    from student_model_v2.distillation.lora import add_lora

    peft_model = add_lora(build_random_teacher(TINY_YAML), rank=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    path = tmp_path_factory.mktemp("student_lora")
    peft_model.save_pretrained(str(path))
    return path
