"""Distillation works on the tiny teacher: after a short CPU run the student's 4-step LCM samples are
closer to the teacher's 50-step CFG DDIM samples than before training and than the teacher's own
4-step DDIM (latent MSE over held-out demo samples)."""

from __future__ import annotations

from student_model_v2 import eval_distillation
from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective
from student_model_v2.training.trainer import run


def test_short_lcm_distillation_beats_untrained_student_and_few_step_teacher(tmp_path):
    out = tmp_path / "run"
    run(LCMObjective, ["--resolution", "64", "--max_train_steps", "40", "--output_dir", str(out),
                       "--lora_rank", "16", "--lora_alpha", "16", "--learning_rate", "2e-3", "--train_batch_size", "4",
                       "--save_steps", "0", "--eval_batches", "0", "--logging_steps", "20",
                       "--w_min", "6.5", "--w_max", "6.5"], "test")
    gaps = eval_distillation.main(["--adapter", str(out / "checkpoint-final"), "--seeds", "0",
                                   "--guidance_scale", "7.5", "--output_json", str(tmp_path / "gaps.json")])
    assert gaps["student_lcm"] < 0.95 * gaps["untrained_student_lcm"], gaps
    assert gaps["student_lcm"] < gaps["teacher_ddim_few"], gaps
