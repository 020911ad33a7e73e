"""eval_distillation over a v2_2 (x0 regression), a v2_4 (LCM) and a v2_5 (PCM, 2 phases) run on the demo data:
every control row, both distances, the run's sampling settings, JSON + markdown; and the trajectory-consistency
arithmetic on a toy trajectory where the answer is known.

The runs are two optimizer steps each (the table's plumbing, not a learning claim); whether the objectives
teach trajectory consistency is tests/test_trajectory_consistency.py, at the budget measured in
docs/distillation.md.
"""

from __future__ import annotations

import json

import pytest

from student_model_v2 import eval_distillation
from student_model_v2.train_lcm_anytext_v2_2 import FastX0RegressionObjective
from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective
from student_model_v2.train_lcm_anytext_v2_5 import PCMObjective
from student_model_v2.training.trainer import run

from .conftest import REPO_ROOT

BUDGET = ["--resolution", "64", "--max_train_steps", "2", "--lora_rank", "4", "--lora_alpha", "4",
          "--learning_rate", "2e-3", "--train_batch_size", "2", "--num_inference_steps", "10", "--seed", "42",
          "--save_steps", "0", "--eval_batches", "0", "--logging_steps", "1000", "--log_image_steps", "0",
          "--lr_warmup_steps", "0", "--lr_scheduler", "constant", "--num_workers", "0",
          "--dataset_json", str(REPO_ROOT / "demodataset" / "annotations" / "demo_data.json")]
OBJECTIVES = {
    "v2_2": (FastX0RegressionObjective, ["--loss_type", "l2"]),
    "v2_4": (LCMObjective, ["--w_min", "6.5", "--w_max", "6.5", "--loss_type", "l2"]),
    "v2_5": (PCMObjective, ["--w_min", "6.5", "--w_max", "6.5", "--loss_type", "l2", "--num_phases", "2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distillation")
    for version, (objective, flags) in OBJECTIVES.items():
        run(objective, [*BUDGET, *flags, "--output_dir", str(root / version)], "test")
    return root


def test_the_table_holds_every_control_and_both_distances(runs):
    output = runs / "eval.json"
    adapters = [str(runs / version / "checkpoint-final") for version in OBJECTIVES]
    report = eval_distillation.main(["--adapter", *adapters, "--steps", "2", "--seeds", "0", "--max_samples", "2",
                                     "--output_json", str(output)])
    labels = [row["label"] for row in report["rows"]]
    assert labels[:3] == ["teacher DDIM, CFG 7.5", "untrained student", "untrained student, PCM sampler 2 steps"]
    assert [row["version"] for row in report["rows"][3:]] == ["v2_2", "v2_4", "v2_5"]
    assert [row["sampler"] for row in report["rows"]] == ["teacher_ddim_cfg", "lcm", "pcm", "lcm", "lcm", "pcm"]
    assert report["functions"] == {"x0": "one step to x0", "pcm2": "jump to 2-phase edges"}
    assert report["teacher_steps"] == 10 and report["held_out_samples"] == 2
    for row in report["rows"]:
        assert set(row["trajectory_consistency_mse"]) == {"x0", "pcm2"}
        assert all(value > 0 for value in row["trajectory_consistency_mse"].values())
        assert set(row["end_sample"]["2"]) == {"mse", "scaled_mse", "correlation"}
        assert row["end_sample"]["2"]["scaled_mse"] <= row["end_sample"]["2"]["mse"] + 1e-9
    assert report["control_strength"] == 1.0 and report["attnx_scale"] == 1.0
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    markdown = output.with_suffix(".md").read_text()
    assert "| teacher DDIM, CFG 7.5 | teacher_ddim_cfg |" in markdown and "| pcm (2 steps) |" in markdown


def test_runs_that_do_not_share_a_teacher_trajectory_are_refused(runs, tmp_path):
    import shutil

    other = tmp_path / "v2_4_other"
    shutil.copytree(runs / "v2_4", other)
    args = json.loads((other / "args.json").read_text())
    args["attnx_scale"] = 0.5
    (other / "args.json").write_text(json.dumps(args))
    with pytest.raises(SystemExit, match="differ in --attnx_scale"):
        eval_distillation.main(["--adapter", str(runs / "v2_4" / "checkpoint-final"),
                                str(other / "checkpoint-final")])


def test_distances_and_trajectory_consistency_on_a_toy_trajectory():
    import torch

    from student_model_v2.distillation import lcm
    from student_model_v2.evaluation.distillation import (
        Case,
        OneStepFunction,
        sample_distances,
        trajectory_consistency_errors,
    )

    ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    far = sample_distances(3.0 * ref, ref)
    assert far["mse"] == pytest.approx(4.0 * float((ref.double() ** 2).mean()), rel=1e-6)
    assert far["scaled_mse"] == pytest.approx(0.0, abs=1e-9) and far["correlation"] == pytest.approx(1.0)

    # with a constant eps the DDIM trajectory is exact: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps at every grid point,
    # so every one-step function lands exactly where it should (TCE 0) and a wrong eps does not
    alphas = lcm.anytext2_alphas_cumprod()
    solver = lcm.DDIMSolver(alphas, 10)
    x0, eps = ref, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    trajectory = {int(t): lcm.add_noise(x0, eps, torch.full((2,), int(t)), alphas) for t in solver.ddim_timesteps}
    trajectory[0] = alphas[0].sqrt() * x0 + (1 - alphas[0]).sqrt() * eps
    case = Case(cond=None, uncond=None, noise=trajectory[999], trajectory=trajectory)
    functions = [OneStepFunction("pcm", 2), OneStepFunction("pcm", 1)]
    exact = trajectory_consistency_errors(case, functions, lambda x, t: eps, solver, alphas)
    assert exact["pcm2"] == pytest.approx(0.0, abs=1e-8) and exact["pcm1"] == pytest.approx(0.0, abs=1e-8)
    wrong = trajectory_consistency_errors(case, functions, lambda x, t: 0.9 * eps, solver, alphas)
    assert wrong["pcm2"] > 1e-4 and wrong["pcm1"] > wrong["pcm2"]  # longer jumps amplify the same eps error
    x0_only = trajectory_consistency_errors(case, [OneStepFunction("x0")], lambda x, t: eps, solver, alphas)
    assert x0_only["x0"] == pytest.approx(float(((x0 - trajectory[0]) ** 2).mean()), rel=1e-4)  # x0 vs the abar[0] end
