"""Checkpoint folders: crash-safe replacement and its recovery, ranking by step, refusal of NaN state."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from student_model_v2.distillation.adapter_info import AdapterInfo
from student_model_v2.training import checkpointing
from student_model_v2.training.checkpointing import (
    STATE_FILE,
    SUMMARY_FILE,
    NonFiniteCheckpointError,
    latest_checkpoint,
    load_training_state,
    recover_checkpoints,
    recover_folder,
    save_checkpoint,
)

INFO = AdapterInfo(version="v2_4", objective="lcm", num_inference_steps=50, lora_targets="attention",
                   lora_rank=2, lora_alpha=2.0)


def _peft_model():
    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))


def _state(step: int, optimizer_state: dict | None = None) -> dict:
    return {"global_step": step, "epoch": 0, "batches_done": step, "num_processes": 1,
            "optimizer": {"state": optimizer_state or {}, "param_groups": []}}


def _fake_checkpoint(folder, step: int, complete: bool = True) -> None:
    folder.mkdir(parents=True)
    torch.save(_state(step), folder / STATE_FILE)
    if complete:
        (folder / SUMMARY_FILE).write_text(json.dumps({"global_step": step}))


def test_save_replaces_atomically_and_recovers_a_crash_between_the_renames(tmp_path, monkeypatch):
    model = _peft_model()
    folder = tmp_path / "checkpoint-final"
    save_checkpoint(folder, model, _state(3), INFO)
    assert json.loads((folder / SUMMARY_FILE).read_text())["global_step"] == 3
    real_replace = os.replace
    calls = []

    def crash_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("simulated crash between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", crash_on_second_rename)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(folder, model, _state(5), INFO)
    monkeypatch.undo()
    assert not folder.exists(), "the crash hit after the old copy was moved aside"
    assert (tmp_path / "checkpoint-final.old").is_dir() and (tmp_path / "checkpoint-final.tmp").is_dir()
    recover_checkpoints(tmp_path)
    assert load_training_state(folder)["global_step"] == 5, "the complete new copy must win"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-final"]
    save_checkpoint(folder, model, _state(6), INFO)
    assert load_training_state(folder)["global_step"] == 6 and AdapterInfo.load(folder) == INFO


def test_recovery_of_every_leftover(tmp_path):
    lone_old = tmp_path / "checkpoint-4"
    _fake_checkpoint(tmp_path / "checkpoint-4.old", 4)
    _fake_checkpoint(tmp_path / "checkpoint-4.tmp", 9, complete=False)  # crashed while writing
    kept = tmp_path / "checkpoint-8"
    _fake_checkpoint(kept, 8)
    _fake_checkpoint(tmp_path / "checkpoint-8.old", 6)
    newer = tmp_path / "checkpoint-epoch-1"
    _fake_checkpoint(newer, 10)
    _fake_checkpoint(tmp_path / "checkpoint-epoch-1.tmp", 11)  # complete, crash before the first rename
    recover_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-8", "checkpoint-epoch-1"]
    assert load_training_state(lone_old)["global_step"] == 4
    assert load_training_state(kept)["global_step"] == 8
    assert load_training_state(newer)["global_step"] == 11
    recover_folder(tmp_path / "checkpoint-99")  # nothing there: nothing to do
    assert not (tmp_path / "checkpoint-99").exists()


def test_latest_ranks_step_epoch_and_final_folders_by_their_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path / "checkpoint-10", 10)
    _fake_checkpoint(tmp_path / "checkpoint-epoch-3", 12)
    assert latest_checkpoint(tmp_path).name == "checkpoint-epoch-3"
    _fake_checkpoint(tmp_path / "checkpoint-final", 12)
    assert latest_checkpoint(tmp_path).name == "checkpoint-final", "equal steps: final wins"
    _fake_checkpoint(tmp_path / "checkpoint-20", 20)
    legacy = tmp_path / "checkpoint-30"  # written before trainer_state.json existed: its state is read
    _fake_checkpoint(legacy, 30, complete=False)
    (tmp_path / "checkpoint-99").mkdir()  # adapter only, no training state: not resumable
    assert latest_checkpoint(tmp_path) == legacy


def test_non_finite_state_is_never_written(tmp_path):
    model = _peft_model()
    folder = tmp_path / "checkpoint-2"
    save_checkpoint(folder, model, _state(2), INFO)
    with pytest.raises(NonFiniteCheckpointError, match="exp_avg"):
        save_checkpoint(folder, model, _state(3, {0: {"exp_avg": torch.tensor([1.0, float("inf")])}}), INFO)
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b[0, 0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match="lora_B"):
        save_checkpoint(folder, model, _state(3), INFO)
    assert load_training_state(folder)["global_step"] == 2, "the previous checkpoint must stay untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
