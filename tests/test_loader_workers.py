"""DataLoader workers as training runs them: fork and spawn, LMDB in workers, signals, dead and hung workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

from student_model_v2.data.dataset import MockAnyTextDataset
from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective
from student_model_v2.training import trainer as trainer_module
from student_model_v2.training.args import build_parser
from student_model_v2.training.data import build_dataloaders
from tests.conftest import REPO_ROOT

TINY_RUN = ["--resolution", "64", "--lora_rank", "4", "--lora_alpha", "4", "--train_batch_size", "2",
            "--eval_batches", "0", "--save_steps", "0", "--logging_steps", "1", "--max_train_steps", "2",
            "--num_workers", "2", "--dataloader_timeout", "120"]


def _start_opencv_pool() -> None:
    """Run OpenCV's thread pool in this process, as building a dataset at 512 px does: a forked worker that
    then calls cv2.setNumThreads deadlocks (what made every num_workers > 0 run hang at the first batch)."""
    cv2.setNumThreads(2)
    cv2.resize(np.zeros((1024, 1024, 3), np.uint8), (512, 512), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("start_method, source", [("fork", "online"), ("fork", "lmdb"), ("spawn", "online"),
                                                  ("spawn", "lmdb")])
def test_two_v2_4_steps_with_two_workers(tmp_path, demo_lmdb, start_method, source):
    _start_opencv_pool()
    argv = TINY_RUN + ["--dataloader_start_method", start_method, "--output_dir", str(tmp_path / "run"),
                       "--cache_dir", str(demo_lmdb / "index")]
    if source == "lmdb":
        argv += ["--lmdb_path", str(demo_lmdb / "cache"), "--no_font_hint_randaug"]
    trainer = trainer_module.run(LCMObjective, argv, "test")
    assert trainer.global_step == 2 and (tmp_path / "run" / "checkpoint-final" / "adapter_model.safetensors").is_file()
    counts = trainer.dataset_stats.as_dict()
    if source == "lmdb":
        assert counts.get("cache.hit", 0) >= 3, counts
        assert not {k for k in counts if k.startswith("cache.")} - {"cache.hit"}, counts
    else:
        assert not any(k.startswith("cache.") for k in counts), counts


def _loaders(tmp_path, *extra: str):
    args = build_parser("t").parse_args(["--use_mock_dataset", "--mock_size", "8", "--resolution", "64",
                                         "--train_batch_size", "2", "--train_ratio", "1", "--val_ratio", "0",
                                         "--test_ratio", "0", *extra])
    return build_dataloaders(args)


def _epochs(loader, epochs: int = 2) -> list[list[dict]]:
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.append(list(loader))
    return out


def test_samples_do_not_depend_on_workers_or_start_method_and_persistent_workers_follow_the_epoch(tmp_path):
    reference = _epochs(_loaders(tmp_path).train)
    for extra in (["--num_workers", "2", "--persistent_workers"],
                  ["--num_workers", "1", "--dataloader_start_method", "spawn", "--persistent_workers"]):
        got = _epochs(_loaders(tmp_path, *extra).train)
        for want_epoch, got_epoch in zip(reference, got):
            assert [b["sample_id"] for b in want_epoch] == [b["sample_id"] for b in got_epoch], extra
            for a, b in zip(want_epoch, got_epoch):
                assert torch.equal(a["masked_img"], b["masked_img"]) and torch.equal(a["font_hint"], b["font_hint"])
    first = {sid: m for b in reference[0] for sid, m in zip(b["sample_id"], b["masked_img"])}
    second = {sid: m for b in reference[1] for sid, m in zip(b["sample_id"], b["masked_img"])}
    assert any(not torch.equal(first[k], second[k]) for k in first), "each epoch must draw new augmentations"


def test_workers_ignore_sigterm_and_a_killed_worker_fails_fast(tmp_path):
    loader = _loaders(tmp_path, "--num_workers", "2", "--dataloader_timeout", "120").train
    iterator = iter(loader)
    next(iterator)
    workers = list(iterator._workers)
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    next(iterator)
    assert all(w.is_alive() for w in workers), "workers must survive the process group's SIGTERM/SIGINT"
    os.kill(workers[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid.*(exited unexpectedly|killed by signal)"):
        for _ in iterator:
            pass
    del iterator


def test_hung_worker_fails_after_the_timeout(tmp_path, monkeypatch, capfd):
    original = MockAnyTextDataset.__getitem__

    def hanging(self, item):
        if item == (0, 3):
            time.sleep(60)
        return original(self, item)

    monkeypatch.setattr(MockAnyTextDataset, "__getitem__", hanging)  # forked workers inherit the patch
    loader = _loaders(tmp_path, "--num_workers", "1", "--dataloader_timeout", "2", "--mock_size", "6").train
    loader.sampler.shuffle = False
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid.*exited unexpectedly"):
        list(loader)
    err = capfd.readouterr().err
    assert "Timeout (0:00:02)!" in err and "in hanging" in err, err[-2000:]
    with pytest.raises(ValueError, match="dataloader_timeout"):
        _loaders(tmp_path, "--num_workers", "1", "--dataloader_timeout", "-1")


def test_bench_train_includes_the_loader_and_reports_the_lora_size(tmp_path, capsys):
    from student_model_v2 import bench
    from student_model_v2.anytext2.checkpoint import build_random_teacher
    from student_model_v2.distillation.lora import add_lora
    from tests.conftest import TINY_YAML

    bench.main(["train", "--num_workers", "2", "--steps", "2", "--warmup", "1", "--lora_rank", "4",
                "--json", str(tmp_path / "bench.json")])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "bench.json").read_text()) == printed
    assert printed["loader_included"] and printed["num_workers"] == 2
    result = printed["versions"]["v2_4"]
    assert result["samples_per_second"] > 0 and 0 <= result["data_wait_seconds_per_step"] <= result["seconds_per_step"]
    peft_model = add_lora(build_random_teacher(TINY_YAML), rank=4, alpha=4)
    assert result["lora_parameters"]["total"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_a_run_that_keeps_persistent_workers_still_exits(tmp_path):
    # multiprocessing's exit handler SIGTERMs leftover workers (ignored) and joins them without a limit: the
    # main process must kill them first, or every template run (persistent workers) hangs after its last step.
    code = ("import sys\n"
            "from student_model_v2.training.args import build_parser\n"
            "from student_model_v2.training.data import build_dataloaders\n"
            "if __name__ == '__main__':\n"
            "    args = build_parser('t').parse_args(['--use_mock_dataset', '--mock_size', '40', '--resolution', '64',\n"
            "        '--num_workers', '2', '--persistent_workers', '--train_batch_size', '2'])\n"
            "    loaders = sys.modules['__main__'].kept = build_dataloaders(args)\n"
            "    for _ in loaders.train:\n"
            "        pass\n"
            "    for loader in (loaders.val, loaders.test):\n"
            "        for _ in loader:\n"
            "            break\n"
            "    print('trained', flush=True)\n")
    script = tmp_path / "keep_workers.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 0 and "trained" in result.stdout, result.stderr[-2000:]
