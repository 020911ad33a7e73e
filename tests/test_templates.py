"""Every shipped YAML template runs, through ``launch_from_yaml.py``, scaled down only in size and steps.

The template file itself is launched; the command line overrides only what makes it small:

* size: the tiny model config and random-init teacher, the demo dataset (and an LMDB cache built from it
  when the template reads one), 64 px, LoRA rank 4; the validation split gets one batch more than
  ``eval_batches`` (a 1 % split of 48 images is one image), so that, as on the full dataset, every
  evaluation stops after ``eval_batches`` batches instead of exhausting its loader;
* steps: 2 optimizer steps, with every step cadence scaled down with them (``save_steps`` 1, so a
  checkpoint and an evaluation happen between the two steps; ``log_image_steps`` 2; ``logging_steps`` 1;
  ``lr_warmup_steps`` 1);
* precision: ``fp16`` becomes ``bf16`` — fp16 autocast needs a GPU (accelerate refuses it on the CPU) and
  bf16 runs the same autocast code path; ``bf16`` and ``no`` are kept.

Everything else is the template's own: ``num_workers`` (forked workers), prefetch, persistent workers,
pin_memory, batch size, gradient accumulation, ``eval_batches``, LR schedule, loss settings and script.
New templates (``student_model_v2/train_config*.yaml``) are picked up automatically. Each run is its own
process, as users start it (accelerate's state is per process, and templates differ in precision), with
``OMP_NUM_THREADS=1`` so that busy-waiting OpenMP threads do not dominate on a shared CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from student_model_v2 import launch_from_yaml as launcher
from student_model_v2.anytext2.checkpoint import build_random_teacher
from student_model_v2.distillation.lora import load_lora
from tests.conftest import REPO_ROOT, TINY_YAML
from tests.test_data_dataset import DEMO_JSON

TEMPLATES = sorted((REPO_ROOT / "student_model_v2").glob("train_config*.yaml"))
STEPS = 2
DEMO_IMAGES = 48


def _settings(template: Path) -> dict:
    """The template's merged keys, read by the launcher's own parser (sections, duplicate-key check)."""
    merged = launcher.merge_sections(launcher.load_template(template), template.name)
    return {key: entry.value for key, entry in merged.items()}


def test_every_template_is_covered():
    names = {p.name for p in TEMPLATES}
    assert {"train_config_quickstart.yaml", "train_config_template.yaml", "train_config_template_v3.yaml",
            "train_config_template_v4.yaml", "train_config_template_v4_LMDB.yaml"} <= names, names


@pytest.mark.parametrize("template", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_template_runs_scaled_down_in_size_and_steps(template, tmp_path, demo_lmdb):
    settings = _settings(template)
    accumulation = int(settings.get("gradient_accumulation_steps", 1))
    overrides = ["--config", str(TINY_YAML), "--teacher_ckpt", "", "--output_dir", str(tmp_path / "out"),
                 "--dataset_json", str(DEMO_JSON), "--cache_dir", str(demo_lmdb / "index"), "--resolution", "64",
                 "--lora_rank", "4", "--lora_alpha", "4", "--max_train_steps", str(STEPS), "--save_steps", "1",
                 "--logging_steps", "1", "--log_image_steps", str(STEPS)]
    batch, eval_batches = int(settings.get("train_batch_size", 1)), int(settings.get("eval_batches", 1))
    if eval_batches > 0:
        val = min(1.0, (eval_batches + 1) * batch / DEMO_IMAGES + 1e-6)
        test = float(settings.get("test_ratio", 0.05))
        overrides += ["--val_ratio", f"{val:.6f}", "--test_ratio", str(test), "--train_ratio", f"{1 - val - test:.6f}"]
    if settings.get("lr_warmup_steps"):
        overrides += ["--lr_warmup_steps", "1"]
    if settings.get("mixed_precision") == "fp16":
        overrides += ["--mixed_precision", "bf16"]
    if settings.get("lmdb_path"):
        overrides += ["--lmdb_path", str(demo_lmdb / "cache")]
    command = [sys.executable, str(REPO_ROOT / "student_model_v2" / "launch_from_yaml.py"), "--config", str(template),
               "--", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]

    finals = list((tmp_path / "out").glob("**/checkpoint-final"))
    assert len(finals) == 1, finals
    state = torch.load(finals[0] / "training_state.pt", weights_only=False)
    assert state["global_step"] == STEPS
    assert state["epoch"] == 0 and state["batches_done"] == STEPS * accumulation, (
        f"{STEPS} optimizer steps at gradient_accumulation_steps {accumulation} must consume "
        f"{STEPS * accumulation} micro-batches, consumed {state['batches_done']} (epoch {state['epoch']})")
    stats = state["dataset_stats"]
    if settings.get("lmdb_path"):
        assert stats.get("cache.hit", 0) > 0 and not stats.get("cache.miss"), stats
    else:
        assert not any(k.startswith("cache.") for k in stats), stats
    if int(settings.get("eval_batches", 1)) > 0:
        assert log.count("[eval] val loss") >= 2, "an evaluation after step 1 (save_steps) and one at the end"
    peft_model = load_lora(build_random_teacher(TINY_YAML), finals[0])
    assert any(float(p.abs().max()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
