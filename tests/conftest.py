"""Shared fixtures: the tiny random-init teacher, a student adapter for it, and repository paths."""

from __future__ import annotations

import os
import struct
import zlib
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


@pytest.fixture(scope="session")
def demo_lmdb(tmp_path_factory):
    """An LMDB render cache of the demo dataset at 64 px (``<root>/cache``) and its JSON index (``<root>/index``)."""
    from student_model_v2.data.anytext_record import RenderOptions
    from student_model_v2.data.glyph_render import DEFAULT_FONT_PATH
    from student_model_v2.data.lmdb_build import build_cache

    root = tmp_path_factory.mktemp("demo_lmdb")
    build_cache([str(REPO_ROOT / "demodataset" / "annotations" / "demo_data.json")], str(root / "cache"),
                opts=RenderOptions(resolution=64), font_path=str(DEFAULT_FONT_PATH), num_workers=0,
                cache_dir=str(root / "index"), progress=False)
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a few bytes of pixel data): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))
