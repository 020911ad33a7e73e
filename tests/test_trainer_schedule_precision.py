"""The trainer's LCM schedule comes from the teacher it trains, and bf16 weights with bf16 autocast run on the CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.distillation.lcm import anytext2_alphas_cumprod
from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective
from student_model_v2.training import trainer as trainer_module
from tests.conftest import REPO_ROOT, TINY_YAML

SCRIPT = REPO_ROOT / "student_model_v2" / "train_lcm_anytext_v2_4.py"

TINY_RUN = ["--resolution", "32", "--lora_rank", "4", "--lora_alpha", "4", "--train_batch_size", "1",
            "--eval_batches", "0", "--save_steps", "0", "--use_mock_dataset", "--mock_size", "2", "--train_ratio", "1.0",
            "--val_ratio", "0", "--test_ratio", "0"]


def test_lcm_schedule_is_the_models_own_for_another_linear_end(tmp_path):
    config = yaml.safe_load(TINY_YAML.read_text())
    config["model"]["params"]["linear_end"] = 0.02
    other = tmp_path / "tiny_linear_end.yaml"
    other.write_text(yaml.safe_dump(config))
    shutil.copy(TINY_YAML.with_name("anytext2_tiny.clip_config.json"), tmp_path / "clip_config.json")
    args = trainer_module.make_parser(LCMObjective, "t").parse_args(
        TINY_RUN + ["--config", str(other), "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1"])
    trainer = trainer_module.Trainer(args, LCMObjective)
    default = anytext2_alphas_cumprod()
    assert not torch.allclose(trainer.model.alphas_cumprod, default), "linear_end 0.02 must change the schedule"
    assert torch.equal(trainer.objective.alphas_cumprod.cpu(), trainer.model.alphas_cumprod)
    solver_alphas = trainer.objective.solver.ddim_alpha_cumprods.cpu()
    grid = trainer.objective.solver.ddim_timesteps.cpu()
    assert torch.equal(solver_alphas, trainer.model.alphas_cumprod[grid])


def test_bf16_teacher_with_bf16_autocast_trains_on_the_cpu(tmp_path):
    # a subprocess: accelerate's process-wide state would pin bf16 for every later test in this session
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY_RUN, "--teacher_dtype", "bf16", "--mixed_precision",
                             "bf16", "--max_train_steps", "1", "--output_dir", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "checkpoint-final"
    assert AdapterInfo.load(folder) is not None
    lora = load_file(str(folder / "adapter_model.safetensors"))
    assert lora and all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in lora.values())
    assert any(bool(t.abs().sum() > 0) for name, t in lora.items() if "lora_B" in name), "the step must update LoRA B"
