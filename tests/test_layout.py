"""The package layout: every script runs in both documented forms, and imports point down the layers.

Layers, lowest first: the teacher (``anytext2``), ``data``, ``distillation`` (LoRA, batch conditioning,
LCM maths, losses, samplers), then ``training`` and ``inference`` side by side, then ``evaluation``,
then the entry-point scripts at the top of ``student_model_v2/``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "student_model_v2"
LAYER_RANKS = {"anytext2": 0, "data": 1, "distillation": 2, "training": 3, "inference": 3, "evaluation": 4}
TOP_RANK = 5


def _scripts() -> list[str]:
    """Every top-level file with a ``__main__`` block."""
    return sorted(p.stem for p in PACKAGE.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def _layer(module: str) -> str | None:
    """The layer package of a dotted module name inside the project, or None for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYER_RANKS) else None


def _is_project_module(name: str) -> bool:
    if not name.startswith("student_model_v2."):
        return False
    location = REPO_ROOT / name.replace(".", "/")
    return location.with_suffix(".py").exists() or (location / "__init__.py").exists()


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the project modules a file imports (relative imports resolved)."""
    package_parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [f"{module}.{alias.name}" for alias in node.names]
            found.update([module, *names])
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if _is_project_module(m)}

def test_every_script_is_listed():
    expected = {"bench", "build_lmdb_cache", "demo_v2", "eval_distillation", "eval_ocr", "infer_lcm_anytext_v2",
                "launch_from_yaml", "make_demo_dataset", "oom_guard", "train_lcm_anytext_v2",
                "train_lcm_anytext_v2_2", "train_lcm_anytext_v2_3", "train_lcm_anytext_v2_4"}
    assert expected <= set(_scripts())


def _help(form: str, script: str) -> tuple[str, str, subprocess.CompletedProcess]:
    command = ([sys.executable, f"student_model_v2/{script}.py", "--help"] if form == "path"
               else [sys.executable, "-m", f"student_model_v2.{script}", "--help"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    return form, script, result


def test_help_in_path_and_module_form():
    """``python student_model_v2/<script>.py --help`` and ``python -m student_model_v2.<script> --help``."""
    jobs = [(form, script) for script in _scripts() for form in ("path", "module")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: _help(*job), jobs))
    failures = [f"{form} {script}: rc={r.returncode}\n{r.stderr[-600:]}" for form, script, r in results
                if r.returncode != 0 or "usage:" not in r.stdout.lower()]
    assert not failures, "\n".join(failures)


def test_script_mode_runs_a_real_command(tmp_path):
    """Path form past --help: the script imports the layers and does its work."""
    result = subprocess.run([sys.executable, "student_model_v2/make_demo_dataset.py", "--out", str(tmp_path),
                             "--count", "1", "--size", "64"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "imgs" / "0000.jpg").exists()


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    own = path.relative_to(PACKAGE).parts[0]
    rank = LAYER_RANKS[own]
    wrong = []
    for module in _imported_modules(path):
        layer = _layer(module)
        if layer is None:
            wrong.append(f"{module} (a top-level entry point)")
        elif layer != own and LAYER_RANKS[layer] >= rank:
            wrong.append(f"{module} (layer {layer!r} is not below {own!r})")
    assert not wrong, f"{path.relative_to(REPO_ROOT)} imports " + ", ".join(sorted(wrong))


def test_layer_check_catches_an_upward_import(tmp_path):
    """The layer test can fail: a data module importing the trainer is reported."""
    bad = PACKAGE / "data" / "_layer_probe.py"
    bad.write_text("from ..training.trainer import run\nfrom ..bench import main\n")
    try:
        imported = _imported_modules(bad)
    finally:
        bad.unlink()
    assert "student_model_v2.training.trainer" in imported and "student_model_v2.bench" in imported
    assert _layer("student_model_v2.bench") is None and _layer("student_model_v2.training.trainer") == "training"
