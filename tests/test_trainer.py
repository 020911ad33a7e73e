"""The shared trainer with the v2_4 objective: LoRA semantics, multi-process sync, resume, SIGTERM."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from student_model_v2.anytext2.checkpoint import build_random_teacher
from student_model_v2.distillation.adapter_info import AdapterInfo, AdapterInfoError
from student_model_v2.distillation.lora import adapters_disabled, add_lora, load_lora, lora_target_modules
from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective
from student_model_v2.training import trainer as trainer_module
from tests.conftest import REPO_ROOT, TINY_YAML
from tests.test_teacher_model import _tiny_text_info

SCRIPT = REPO_ROOT / "student_model_v2" / "train_lcm_anytext_v2_4.py"
FAST = ["--resolution", "64", "--lora_rank", "4", "--lora_alpha", "4", "--train_batch_size", "2",
        "--eval_batches", "0", "--save_steps", "0", "--logging_steps", "1"]


def test_student_equals_teacher_at_init_and_only_lora_trains():
    model = build_random_teacher(TINY_YAML)
    base = {n: p.data_ptr() for n, p in model.named_parameters()}
    base_count = sum(p.numel() for p in model.parameters())
    names = lora_target_modules(model)
    peft_model = add_lora(model, rank=4, alpha=4)
    info = _tiny_text_info()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        cond, _ = model.encode_conditions(info, ["a sign"] * 2, ["Text says * , * . "] * 2)
        student = model.predict_eps(x, 400, cond, model.control_residuals(cond))
        with adapters_disabled(peft_model):
            teacher = model.predict_eps(x, 400, cond, model.control_residuals(cond))
    assert torch.equal(student, teacher)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lora_count = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in peft_model.parameters()) == base_count + lora_count
    wrapped = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.data_ptr()
               for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert wrapped == base, "the base weights must be shared, not copied"
    assert all(n.startswith(("model.diffusion_model.", "control_model.")) for n in names)
    assert not any(block in n for n in names for block in ("glyph_block", "position_block", "fuse_block_za"))
    assert "control_model.middle_block_out.0" in names and any(".attn1x." in n for n in names)
    student = trainer_module.StudentForward(peft_model).train()
    assert student.training
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)), "frozen BN must stay in eval"


def _run_in_process(monkeypatch, argv):
    seen = []
    original = trainer_module.Trainer._micro_step

    def recording(self, batch, generator):
        if self.student.training:
            seen.append(tuple(batch["sample_id"]))
        return original(self, batch, generator)

    monkeypatch.setattr(trainer_module.Trainer, "_micro_step", recording)
    trainer = trainer_module.run(LCMObjective, argv, "test")
    monkeypatch.undo()
    lora = {n: p.detach().clone() for n, p in trainer.student.named_parameters() if p.requires_grad}
    return lora, seen, trainer


def _optimizer_steps(trainer) -> int:
    """Updates AdamW really applied (its per-parameter step count), not the trainer's own counter."""
    param = next(p for p in trainer.optimizer.optimizer.param_groups[0]["params"])
    return int(trainer.optimizer.optimizer.state[param]["step"])


def test_resume_continues_weights_and_data_order_exactly(tmp_path, monkeypatch):
    common = FAST + ["--max_train_steps", "6", "--gradient_accumulation_steps", "2", "--lr_scheduler",
                     "warmup_cosine", "--lr_warmup_steps", "2", "--learning_rate", "1e-3", "--train_ratio", "0.25",
                     "--val_ratio", "0.0", "--test_ratio", "0.75"]
    full, full_order, _ = _run_in_process(monkeypatch, common + ["--output_dir", str(tmp_path / "full")])
    _, first_order, _ = _run_in_process(monkeypatch, common + ["--output_dir", str(tmp_path / "split"), "--stop_after_steps", "2"])
    assert (tmp_path / "split" / "checkpoint-2" / "training_state.pt").is_file()
    info = AdapterInfo.load(tmp_path / "split" / "checkpoint-2")
    assert (info.version, info.objective, info.num_inference_steps) == ("v2_4", "lcm", 50)
    resumed, second_order, _ = _run_in_process(
        monkeypatch, common + ["--output_dir", str(tmp_path / "split"), "--resume_path", "latest", "--resume_optimizer"])
    assert first_order + second_order == full_order
    assert len(full_order) == 12 and len(set(full_order[:6])) == 6
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    assert any(float(v.abs().max()) > 0 for n, v in full.items() if "lora_B" in n), "training must move LoRA B"


def test_accumulation_survives_evaluations_epochs_and_resume(tmp_path, monkeypatch):
    # 20 training samples at batch 2 = 10 micro-batches per epoch: at accumulation 4 an epoch is 4 + 4 + 2
    # (the epoch end forces the third update). Evaluation runs after every checkpoint (every 2 updates) on a
    # 4-sample val split, 2 batches: before the fix the loop broke out of it after 1 batch and from then on
    # every micro-batch became an update (6 updates from 18 micro-batches).
    common = FAST + ["--max_epochs", "2", "--max_train_steps", "0", "--gradient_accumulation_steps", "4",
                     "--save_steps", "2", "--eval_batches", "1", "--train_ratio", "0.4", "--val_ratio", "0.09",
                     "--test_ratio", "0.51", "--lr_scheduler", "warmup_cosine", "--lr_warmup_steps", "2",
                     "--learning_rate", "1e-3"]
    evaluations = []
    original_evaluate = trainer_module.Trainer.evaluate

    def counting_evaluate(self, split):
        value = original_evaluate(self, split)
        evaluations.append((split, self.global_step, value))
        references = self.accelerator.gradient_state.dataloader_references
        assert self.val_loader not in references and self.test_loader not in references, "eval loader left active"
        return value

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", counting_evaluate)
    full, full_order, trainer = _run_in_process(monkeypatch, common + ["--output_dir", str(tmp_path / "full")])
    assert len(full_order) == 20 and trainer.global_step == 6 and _optimizer_steps(trainer) == 6
    assert [(split, step) for split, step, _ in evaluations] == [("val", 2), ("val", 4), ("val", 6), ("test", 6)]
    assert all(math.isfinite(value) for _, _, value in evaluations)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", counting_evaluate)
    _, first_order, first = _run_in_process(
        monkeypatch, common + ["--output_dir", str(tmp_path / "split"), "--stop_after_steps", "2"])
    assert len(first_order) == 8 and _optimizer_steps(first) == 2
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", counting_evaluate)
    resumed, second_order, second = _run_in_process(
        monkeypatch, common + ["--output_dir", str(tmp_path / "split"), "--resume_path", "latest", "--resume_optimizer"])
    assert first_order + second_order == full_order
    assert _optimizer_steps(second) == 6, "the restored AdamW state continues the count"
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_resume_keeps_the_checkpoints_step_plan(caplog):
    view = SimpleNamespace(args=SimpleNamespace(max_epochs=0, max_train_steps=100), steps_per_epoch=10)
    view._planned_steps = lambda: trainer_module.Trainer._planned_steps(view)
    assert trainer_module.Trainer._step_plan(view, None) == (100, 100)
    after_add_steps = {"schedule_steps": 100, "total_steps": 150}
    assert trainer_module.Trainer._step_plan(view, after_add_steps) == (100, 150), "the cosine horizon must not move"
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="student_model_v2.train"):
        assert trainer_module.Trainer._step_plan(view, {"schedule_steps": 80, "total_steps": 80}) == (80, 80)
    assert "flags plan 100 optimizer steps but the checkpoint's run planned 80" in caplog.text


def test_two_cpu_processes_average_gradients(tmp_path):
    # accelerate 1.15's `--cpu` launcher starts one process unless MPI is set up; `--multi_gpu` with
    # ACCELERATE_USE_CPU=1 starts torchrun workers that use the gloo backend on the CPU.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
               str(REPO_ROOT / "tests" / "drivers" / "ddp_gradients.py"), str(tmp_path)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["sample_ids"] != ranks[1]["sample_ids"], "each rank must see its own shard"
    names = list(ranks[0]["final"])
    for name in names:
        assert torch.equal(ranks[0]["final"][name], ranks[1]["final"][name]), name
    params = [ranks[0]["initial"][n].clone().requires_grad_(True) for n in names]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for param, name in zip(params, names):
        param.grad = (ranks[0]["local_grad"][name] + ranks[1]["local_grad"][name]) / 2
    optimizer.step()
    differs = 0
    for param, name in zip(params, names):
        torch.testing.assert_close(ranks[0]["final"][name], param.detach(), rtol=0, atol=1e-6, msg=name)
        differs += not torch.equal(ranks[0]["local_grad"][name], ranks[1]["local_grad"][name])
    assert differs > 0, "the ranks' local gradients must differ for the check to mean anything"


@pytest.mark.parametrize("sender", ["killpg", "oom_guard"])
def test_sigterm_to_the_group_with_workers_checkpoints_then_exits_143(tmp_path, sender):
    # What Slurm (kill -TERM -PGID) and oom_guard.py (forwarding its own SIGTERM) do: the whole process
    # group, DataLoader workers included, gets SIGTERM in the middle of an accumulation window.
    from student_model_v2.oom_guard import group_members

    out = tmp_path / "run"
    train = [sys.executable, str(SCRIPT), *FAST, "--max_train_steps", "500", "--output_dir", str(out),
             "--gradient_accumulation_steps", "2", "--num_workers", "2", "--persistent_workers"]
    guard = [sys.executable, str(REPO_ROOT / "student_model_v2" / "oom_guard.py"), "--min-available-gb", "0",
             "--interval", "0.5", "--kill-timeout", "300", "--"]
    process = subprocess.Popen(guard + train if sender == "oom_guard" else train, cwd=REPO_ROOT,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    log = ""
    while time.time() < deadline and process.poll() is None:
        line = process.stdout.readline()
        log += line
        if "loss=" in line:
            break
    group = process.pid if sender == "killpg" else None
    if sender == "killpg":
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)  # the guard forwards it to the trainer's own group
    rest, _ = process.communicate(timeout=300)
    log += rest
    assert process.returncode == trainer_module.SIGTERM_EXIT_CODE, log[-3000:]
    assert "received signal 15" in log and "stopped early (signal)" in log, log[-3000:]
    assert "Traceback" not in log and "exited unexpectedly" not in log, log[-3000:]
    if group is not None:
        assert not group_members(group), "the workers must be shut down with the trainer"
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and checkpoints[0].name.startswith("checkpoint-"), log[-2000:]
    assert not checkpoints[0].name.endswith((".tmp", ".old")), log[-2000:]
    model = build_random_teacher(TINY_YAML)
    peft_model = load_lora(model, checkpoints[0])
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())
    state = torch.load(checkpoints[0] / "training_state.pt", weights_only=False)
    assert state["global_step"] == int(checkpoints[0].name.split("-")[1]) > 0
    assert state["batches_done"] == 2 * state["global_step"], "the accumulation window must be finished"


def test_bad_objective_flags_fail_early(tmp_path):
    with pytest.raises(ValueError, match="w_min"):
        trainer_module.run(LCMObjective, FAST + ["--max_train_steps", "1", "--w_min", "9", "--w_max", "2",
                                                 "--output_dir", str(tmp_path), "--use_mock_dataset", "--mock_size", "4"], "t")


def test_gradient_checkpointing_gives_the_same_gradients():
    from student_model_v2.anytext2.unet import set_gradient_checkpointing

    model = build_random_teacher(TINY_YAML)
    peft_model = add_lora(model, rank=4, alpha=4)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    info = _tiny_text_info()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond, _ = model.encode_conditions(info, ["a sign"] * 2, ["Text says * , * . "] * 2)

    def grads():
        peft_model.zero_grad(set_to_none=True)
        model.predict_eps(x, 300, cond, model.control_residuals(cond)).square().mean().backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    calls = []
    model.unet.middle_block[0].register_forward_hook(lambda *_: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    assert set_gradient_checkpointing(model.unet) > 0 and set_gradient_checkpointing(model.control_model) > 0
    checkpointed = grads()
    assert len(calls) == 3, "with checkpointing the block runs again in backward"
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_adapter_info_round_trip_and_refusals(tmp_path):
    info = AdapterInfo(version="v2_4", objective="lcm", num_inference_steps=50, lora_targets="official",
                       lora_rank=8, lora_alpha=8.0)
    info.save(tmp_path)
    assert AdapterInfo.load(tmp_path) == info
    assert AdapterInfo.load(tmp_path / "missing") is None
    (tmp_path / "distillation.json").write_text('{"version": "v2_4"}')
    with pytest.raises(AdapterInfoError, match="missing keys"):
        AdapterInfo.load(tmp_path)
    with pytest.raises(AdapterInfoError, match="num_phases"):
        AdapterInfo(version="v2_5", objective="pcm", num_inference_steps=50, lora_targets="official",
                    lora_rank=8, lora_alpha=8.0)


def _launch_two_cpu_processes(driver: str, port: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(REPO_ROOT / "tests" / "drivers" / driver), *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_nan_on_one_rank_skips_the_same_update_everywhere(tmp_path):
    result = _launch_two_cpu_processes("nonfinite_rank.py", 29523, str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for record in ranks:
        assert record["micro_batches"] == 6
        assert [(s["step"], s["skipped"]) for s in record["steps"]] == [(1, False), (2, True), (3, False)]
        assert record["skips"] == 1
        after = [s["lora"] for s in record["steps"]]
        for name, value in after[0].items():
            assert torch.isfinite(after[2][name]).all(), name
            assert torch.equal(after[1][name], value), f"{name}: the skipped update must not move the weights"
        assert any(not torch.equal(after[2][n], after[1][n]) for n in after[0]), "step 3 must update again"
    for name, value in ranks[0]["steps"][-1]["lora"].items():
        assert torch.equal(ranks[1]["steps"][-1]["lora"][name], value), f"{name}: ranks diverged"
    logged = {step: values for step, values in ranks[0]["logged"] if "train/nonfinite_skips" in values}
    assert [logged[s]["train/nonfinite_skips"] for s in (1, 2, 3)] == [0, 1, 1]
    # rank 0 reports 1 skipped sample per micro-batch, rank 1 reports 2: the log shows the sum of both
    assert logged[3]["data/skipped_samples"] == 6 * 1 + 6 * 2
    state = torch.load(tmp_path / "checkpoint-final" / "training_state.pt", weights_only=False)
    assert state["nonfinite_skips"] == 1 and state["dataset_stats"]["sample.injected"] == 18
    assert [counts["sample.injected"] for counts in state["dataset_stats_per_rank"]] == [6, 12]
    # this 2-process checkpoint cannot be continued exactly by one process: refused, not silently reinterpreted
    with pytest.raises(ValueError, match="num_processes 2 -> 1"):
        trainer_module.run(LCMObjective, FAST + ["--train_batch_size", "1", "--gradient_accumulation_steps", "2",
                                                 "--output_dir", str(tmp_path), "--resume_path", "latest",
                                                 "--resume_optimizer", "--max_train_steps", "3"], "t")


def test_latest_resumes_finished_runs_and_add_steps_never_trains_at_lr_0(tmp_path, monkeypatch):
    from student_model_v2.training.checkpointing import latest_checkpoint
    from student_model_v2.training.data import DatasetStats

    out = tmp_path / "run"
    common = FAST + ["--output_dir", str(out), "--use_mock_dataset", "--mock_size", "8", "--lr_scheduler",
                     "warmup_cosine", "--learning_rate", "1e-3", "--save_steps", "1", "--max_train_steps", "2"]
    original_update = DatasetStats.update

    def one_skip_per_batch(self, issues):
        original_update(self, issues)
        self.counts.update({"sample.injected": 1})

    monkeypatch.setattr(DatasetStats, "update", one_skip_per_batch)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        trainer_module.run(LCMObjective, common + ["--resume_path", "latest", "--resume_optimizer"], "t")
    first = trainer_module.run(LCMObjective, common, "t")
    assert first.global_step == 2 and first.dataset_stats.counts["sample.injected"] == 2
    assert latest_checkpoint(out).name == "checkpoint-final", "checkpoint-1 has the higher name-number only"
    final_state = (out / "checkpoint-final" / "training_state.pt").read_bytes()

    again = trainer_module.run(LCMObjective, common + ["--resume_path", "latest", "--resume_optimizer"], "t")
    assert again.global_step == 2 and again.resume_dir.name == "checkpoint-final"
    assert (out / "checkpoint-final" / "training_state.pt").read_bytes() == final_state, "a finished run is not rewritten"

    with pytest.raises(ValueError, match="would train at learning rate 0"):
        trainer_module.run(LCMObjective, common + ["--resume_path", "latest", "--resume_optimizer",
                                                   "--resume_add_steps", "2"], "t")
    lrs = []
    original_after_step = trainer_module.Trainer._after_step

    def record_lr(self, *rest):
        lrs.append(self.lr_scheduler.get_last_lr()[0])
        original_after_step(self, *rest)

    monkeypatch.setattr(trainer_module.Trainer, "_after_step", record_lr)
    longer = trainer_module.run(LCMObjective, common + ["--resume_path", "latest", "--resume_optimizer",
                                                        "--resume_add_steps", "2", "--lr_min_ratio", "0.1"], "t")
    assert longer.global_step == 4 and _optimizer_steps(longer) == 4
    assert lrs == pytest.approx([1e-4, 1e-4]), "the added steps train at the cosine floor, never at 0"
    assert longer.dataset_stats.counts["sample.injected"] == 4, "skipped-sample counts survive the resume"
    assert latest_checkpoint(out).name == "checkpoint-final"
    state = torch.load(out / "checkpoint-final" / "training_state.pt", weights_only=False)
    assert state["global_step"] == 4 and state["dataset_stats"]["sample.injected"] == 4

    # the fp16 grad scaler (GPU only under accelerate) travels with the state: checked with a CPU scaler
    longer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7)
    saved = longer._training_state()
    assert saved["grad_scaler"]["scale"] == 2.0**7
    longer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    longer._restore_state(saved)
    assert longer.accelerator.scaler.get_scale() == 2.0**7


def test_persistent_non_finite_losses_stop_the_run_with_a_clear_error(tmp_path):
    # LR 1e30 sends the LoRA weights to ~1e30 at the first update; every later loss overflows. The second
    # skip in a row ends the run (exit 1, no checkpoint) and the workers, which ignore SIGTERM, do not keep
    # the interpreter from exiting.
    from student_model_v2.oom_guard import group_members

    out = tmp_path / "run"
    command = [sys.executable, str(SCRIPT), *FAST, "--max_train_steps", "50", "--output_dir", str(out),
               "--learning_rate", "1e30", "--max_grad_norm", "0", "--adam_weight_decay", "0",
               "--max_consecutive_nonfinite", "2", "--num_workers", "2", "--persistent_workers"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 1, log[-3000:]
    assert "NonFiniteLossError: 2 consecutive optimizer steps (up to step 3)" in log, log[-3000:]
    # the first skip is a warning, the second in a row the error
    assert "--max_consecutive_nonfinite 2" in log and log.count("update skipped on every rank") == 1, log[-3000:]
    assert not list(out.glob("checkpoint-*")), "no checkpoint after a non-finite stop"
    assert not group_members(process.pid), "no worker may outlive the trainer"
