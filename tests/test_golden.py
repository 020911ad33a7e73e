"""The teacher reproduces the original AnyText2 numerics on the golden case(s)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import GOLDEN_DIR, REPO_ROOT


def _run_golden(*case_dirs):
    return subprocess.run(
        [sys.executable, "-m", "student_model_v2.anytext2.golden", *map(str, case_dirs)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("case", sorted(p.name for p in GOLDEN_DIR.iterdir() if p.is_dir()))
def test_golden_case_passes_every_tensor(case):
    result = _run_golden(GOLDEN_DIR / case)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("golden: ") and lines[-1].endswith(" 0 failed"), lines[-1]
    compared = [line for line in lines if line.startswith("out.")]
    assert compared and all(" ok " in line for line in compared)


def test_golden_check_fails_on_a_perturbed_reference(tmp_path):
    """The checker must be able to fail: nudge one reference tensor past the tolerance."""
    case = tmp_path / "tiny_a_perturbed"
    shutil.copytree(GOLDEN_DIR / "tiny_a", case)
    tensors = load_file(str(case / "tensors.safetensors"))
    ref = tensors["out.em.pos"]
    tensors["out.em.pos"] = ref + 2e-3 * ref.abs().max()
    del tensors["out.control.guided_hint"]
    save_file(tensors, str(case / "tensors.safetensors"))
    result = _run_golden(case)
    assert result.returncode != 0
    assert "out.em.pos" in result.stdout and "FAIL" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith(" 1 failed")


def test_golden_check_rejects_a_folder_without_a_case(tmp_path):
    result = _run_golden(tmp_path)
    assert result.returncode != 0
    assert "no case.json" in result.stdout
