"""Training throughput paths (issue 14): fused AdamW, TF32 flags, host reads per step, bench's batch search."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from student_model_v2.bench import search_max_batch
from student_model_v2.train_lcm_anytext_v2_4 import LCMObjective, build_argument_parser
from student_model_v2.training import trainer as trainer_module
from student_model_v2.training.speed import build_adamw, configure_tf32, keep_implementation, tf32_state
from tests.conftest import REPO_ROOT

HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "cpu", "tolist", "numpy")
# Conditioning still reads the batch on the host a few times per step (the position masks once for the style
# crops' boxes, line counts, caption placeholders); tests/test_conditioning_batched.py counts its reads.
CONDITIONING_FILES = ("student_model_v2/anytext2/", "student_model_v2/distillation/conditioning.py")
ADAMW_FLAGS = dict(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8)


def _adamw_run(fused: bool, grads: list[list[torch.Tensor]], start: list[torch.Tensor]):
    params = [torch.nn.Parameter(p.clone()) for p in start]
    optimizer, implementation = build_adamw(params, SimpleNamespace(no_fused_adamw=not fused, **ADAMW_FLAGS))
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        optimizer.step()
    return params, optimizer, implementation


def test_fused_adamw_matches_the_default_update_on_cpu():
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=generator), torch.randn(32, generator=generator)]
    grads = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(3)]
    fused, fused_opt, fused_impl = _adamw_run(True, grads, start)
    plain, plain_opt, plain_impl = _adamw_run(False, grads, start)
    assert (fused_impl, plain_impl) == ("fused", "unfused")
    assert fused_opt.param_groups[0]["fused"] and not plain_opt.param_groups[0]["fused"]
    for a, b, p0 in zip(fused, plain, start):
        assert (a - p0).abs().max() > 1e-3  # three steps at lr 1e-3 moved the weights ...
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # ... and both kernels agree to float32 round-off
    # a resumed run keeps its own implementation whatever the checkpoint's was
    fused_opt.load_state_dict(plain_opt.state_dict())
    keep_implementation(fused_opt, "fused")
    assert fused_opt.param_groups[0]["fused"] is True
    fused_opt.step()
    plain_opt.load_state_dict(fused_opt.state_dict())
    keep_implementation(plain_opt, "unfused")
    assert plain_opt.param_groups[0]["fused"] is None
    assert all(s["step"].device.type == "cpu" for s in plain_opt.state.values())


def test_tf32_flags_default_on_and_turn_off():
    parser = build_argument_parser()
    assert parser.parse_args([]).allow_tf32 is True
    assert parser.parse_args(["--no_tf32"]).allow_tf32 is False
    assert parser.parse_args(["--no-allow_tf32"]).allow_tf32 is False
    assert parser.parse_args(["--allow_tf32"]).allow_tf32 is True  # YAML templates' allow_tf32: true
    assert parser.parse_args([]).no_fused_adamw is False
    before = tf32_state()
    try:
        configure_tf32(False)
        assert tf32_state() == {"matmul": False, "cudnn": False}
        configure_tf32(True)
        assert tf32_state() == {"matmul": True, "cudnn": True}
    finally:
        configure_tf32(before["matmul"])


class _HostReads:
    """Counts tensor-to-host reads (``.item()``, ``bool(t)``, ``.cpu()``, ...) by their caller's file and line."""

    def __init__(self, monkeypatch) -> None:
        self.active = False
        self.sites: collections.Counter = collections.Counter()
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, method):
        def counted(tensor, *args, **kwargs):
            if self.active:
                ours = [f for f in traceback.extract_stack()[:-1] if "student_model_v2" in f.filename]
                where = f"{ours[-1].filename.split(str(REPO_ROOT) + os.sep)[-1]}:{ours[-1].lineno}" if ours else "torch"
                self.sites[(name, where)] += 1
            return method(tensor, *args, **kwargs)

        return counted

    def outside_conditioning(self) -> dict:
        return {site: n for site, n in self.sites.items() if not site[1].startswith(CONDITIONING_FILES)}


def test_training_steps_read_the_host_once_per_optimizer_step(tmp_path, monkeypatch):
    """Between logging steps the trainer's only host read is the combined non-finite/stop flag (with
    --channels_last, which must not add any).

    Counted over optimizer steps 2 and 3 (logging at step 1 only), two micro-batches each: the
    micro-batch without an update reads nothing, the boundary reads once. Reads from conditioning are
    listed in CONDITIONING_FILES and excluded (see there).
    """
    reads = _HostReads(monkeypatch)
    train_step, after_step = trainer_module.Trainer.train_step, trainer_module.Trainer._after_step

    def counted_step(self, batch):  # the loader's fetches between steps are host work, not counted
        reads.active = self.global_step >= 1
        try:
            return train_step(self, batch)
        finally:
            reads.active = False

    def counted_after(self, *args):
        reads.active = self.global_step >= 2
        try:
            after_step(self, *args)
        finally:
            reads.active = False

    monkeypatch.setattr(trainer_module.Trainer, "train_step", counted_step)
    monkeypatch.setattr(trainer_module.Trainer, "_after_step", counted_after)
    before = tf32_state()
    try:
        trainer = trainer_module.run(LCMObjective, [
            "--resolution", "64", "--lora_rank", "4", "--lora_alpha", "4", "--lora_targets", "attention",
            "--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--max_train_steps", "3",
            "--logging_steps", "100", "--eval_batches", "0", "--save_steps", "0", "--no_tf32", "--channels_last",
            "--output_dir", str(tmp_path)], "test")
        assert tf32_state() == {"matmul": False, "cudnn": False}  # --no_tf32 reached torch
    finally:
        configure_tf32(before["matmul"])
    assert trainer.global_step == 3 and trainer.optimizer_implementation == "fused"
    unet_conv = trainer.model.unet.input_blocks[0][0].weight  # the attention LoRA set leaves it unwrapped
    assert trainer.acceleration.channels_last and unet_conv.is_contiguous(memory_format=torch.channels_last)
    assert reads.sites, "the counter saw nothing: the patch did not take"
    assert reads.outside_conditioning() == {("tolist", "student_model_v2/training/trainer.py:"
                                              f"{_combined_read_line()}"): 2}


def _combined_read_line() -> int:
    source = Path(trainer_module.__file__).read_text().splitlines()
    lines = [i + 1 for i, line in enumerate(source) if "acc.reduce(flags, reduction=\"sum\").tolist()" in line]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("cap, largest, tries", [
    (64, 5, [1, 2, 4, 8, 6, 5]),
    (3, 3, [1, 2, 3]),
    (64, 0, [1]),
    (64, 64, [1, 2, 4, 8, 16, 32, 64]),
])
def test_batch_search_doubles_then_bisects(cap, largest, tries):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= largest

    assert search_max_batch(fits, cap) == min(largest, cap)
    assert tried == tries


def _bench_find(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "student_model_v2.bench", "train", "--find_max_batch", "--max_batch", "2",
                    "--try_steps", "1", "--steps", "1", "--warmup", "0", "--resolution", "64", "--lora_rank", "4",
                    "--lora_targets", "attention", "--json", str(out), *extra],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())["versions"]["v2_4"]


def test_bench_find_max_batch_on_cpu_with_a_memory_limit(tmp_path):
    """The search runs for real on the CPU: without a limit the cap wins, with one a batch fails on memory."""
    free = _bench_find(tmp_path, "free")
    assert [(t["batch_size"], t["fits"]) for t in free["trials"]] == [(1, True), (2, True)]
    assert free["max_batch"] == 2 and free["capped_by"] == "--max_batch"
    timed = free["at_max_batch"]
    assert timed["batch_size"] == 2 and timed["peak_memory_kind"] == "process_peak_rss"
    assert timed["unet_calls_per_step"] == [["teacher", 4], ["student", 2], ["target", 2]]
    assert timed["writenet_calls_per_step"] == [["teacher", 4], ["student", 2]]
    assert timed["vae_calls_per_step"] == [["encode", 4]] and timed["tflop_per_step"] > 0
    assert "model_flops_utilisation" not in timed  # CUDA only
    peaks = {t["batch_size"]: t["peak_memory_gb"] for t in free["trials"]}
    assert peaks[2] > peaks[1] > 0
    # batch 2 adds ~65 MB of peak RSS here; with the search's mmap threshold both figures repeat to the MB
    limit = round((peaks[1] + peaks[2]) / 2, 3)
    limited = _bench_find(tmp_path, "limited", "--memory_limit_gb", str(limit))
    assert limited["memory_limit_gb"] == limit
    for trial in limited["trials"]:
        assert trial["fits"] == (trial["peak_memory_gb"] <= limit) and not trial["out_of_memory"]
    assert [(t["batch_size"], t["fits"]) for t in limited["trials"]] == [(1, True), (2, False)]
    assert limited["max_batch"] == 1 and limited["at_max_batch"]["unet_calls_per_step"][0] == ["teacher", 2]


def _lora_model(seed: int):
    """The tiny teacher with rank-4 LoRA whose B weights are non-zero, the same for every call."""
    from student_model_v2.anytext2.checkpoint import build_random_teacher
    from student_model_v2.distillation.lora import add_lora
    from tests.conftest import TINY_YAML

    torch.manual_seed(seed)
    model = build_random_teacher(TINY_YAML)
    peft_model = add_lora(model, rank=4, alpha=4)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    return model, peft_model


def test_compiled_channels_last_training_modules_give_the_eager_loss_and_gradients():
    """--compile (traced by aot_eager: the graphs inductor would get, without generating kernels) plus
    --channels_last on the UNet and WriteNet: loss and LoRA gradients equal eager's to float round-off, and
    the state-dict names a checkpoint saves are unchanged."""
    from student_model_v2.training.speed import accelerate_trained_modules

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def loss_and_grads(flags: dict):
        model, peft_model = _lora_model(0)
        names = list(peft_model.state_dict())
        acceleration = accelerate_trained_modules(peft_model, SimpleNamespace(**flags))
        with torch.no_grad():
            cond, _ = model.encode_conditions(_text_info(), ["a sign"] * 2, ["Text says * , * . "] * 2)
        loss = model.predict_eps(x, 300, cond, model.control_residuals(cond)).square().mean()
        loss.backward()
        assert list(peft_model.state_dict()) == names
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        return acceleration, loss.detach(), grads

    eager_flags = dict(compile=False, compile_mode="default", compile_backend="inductor", channels_last=False)
    _, eager_loss, eager_grads = loss_and_grads(eager_flags)
    acceleration, fast_loss, fast_grads = loss_and_grads(
        dict(eager_flags, compile=True, compile_backend="aot_eager", channels_last=True))
    assert acceleration.compiled == {"unet": "aot_eager", "writenet": "aot_eager"} and acceleration.channels_last
    torch.testing.assert_close(fast_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == eager_grads.keys() and all(g.abs().max() > 0 for g in eager_grads.values())
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _text_info() -> dict:
    from tests.test_trainer import _tiny_text_info

    return _tiny_text_info()


@pytest.mark.parametrize("flags, message", [
    (["--compile_mode", "max-autotune"], "--compile_mode needs --compile"),
    (["--compile_backend", "aot_eager"], "--compile_backend needs --compile"),
])
def test_compile_settings_without_compile_are_refused_before_the_model_builds(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        trainer_module.run(LCMObjective, ["--use_mock_dataset", "--mock_size", "2", "--output_dir", str(tmp_path),
                                          *flags], "test")


def test_reduce_overhead_is_not_a_training_compile_mode():
    with pytest.raises(SystemExit):
        build_argument_parser().parse_args(["--compile", "--compile_mode", "reduce-overhead"])
