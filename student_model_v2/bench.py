"""Benchmarks, one subcommand each, every one printing a JSON object on stdout (``--json PATH`` also
writes it to a file).

    python -m student_model_v2.bench data [--dataset_json ...] [--min_lines 5] [--repeats 3]
    python -m student_model_v2.bench train --version v2_4 [--config ...] [--batch_size 2] [--steps 5] [--num_workers 2]
    python -m student_model_v2.bench train --find_max_batch [--max_batch 64] [--memory_limit_gb 100]
    python -m student_model_v2.bench teacher [--config models_yaml/anytext2_sd15.yaml] [--dtype bf16]
    python -m student_model_v2.bench infer [--config ...] [--resolution 64] [--num_images 4] [--repeats 3]

``data``: CPU milliseconds per sample of the data pipeline in a single worker (torch/OpenCV pinned to
one thread): the online path (font-hint randaug on, as in training), the online path with randaug
off, and the LMDB path (randaug off, which the cache needs), plus the cache build time. Only samples
with at least ``--min_lines`` usable lines are timed.

``train``: per training version, seconds per optimizer step and samples per second with the real
DataLoader in the loop (the training split of ``--dataset_json``, default the demo set, read with
``--num_workers`` workers, optionally through ``--lmdb_path``; batches are pulled from the loader inside
the timed steps, and ``data_wait_seconds_per_step`` is the part spent waiting for them), the trainable
LoRA parameter count, the UNet, WriteNet, VAE-encoder and CLIP caption calls of one step with their batch
rows, parameter memory (frozen base vs LoRA), peak memory (CUDA: ``max_memory_allocated``; CPU: the
process's peak RSS, VmHWM), the FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``: matmuls,
convolutions and attention of every pass, backward included) and, on CUDA, the model FLOP utilisation
against ``--peak_tflops`` (default the H200's dense bf16 989 TFLOPS). Several ``--version`` values run in
one process, so their ratios are comparable. Without ``--teacher_ckpt`` the teacher is the random init
rule (fine for timing: the cost does not depend on the weights). ``--find_max_batch`` searches the
largest batch that fits (doubling from 1, then bisection; each try runs ``--try_steps`` steps and fails
on ``torch.OutOfMemoryError`` or a peak above ``--memory_limit_gb``, up to ``--max_batch`` and the
training set's size), lists every try, and times ``--steps`` steps at the batch it found.

``infer``: end-to-end latency of one inference request (glyph rendering, OCR/CLIP/VAE-encode
conditioning, sampling and VAE decode; same request, image count and seed) for the teacher (20 DDIM
steps, CFG 7.5) and the student (4 LCM steps, merged LoRA), their ratio, and the UNet/WriteNet passes
counted by wrapping the model's methods. The target is a speed-up of at least 0.85 of the pass-count
ratio (teacher 40 UNet + 2 WriteNet passes vs student 4 + 1). Without ``--lora_path`` the student is a
freshly initialised rank-64 LoRA, merged (the cost does not depend on its values). Timed requests are
steady-state ones: the pipeline's once-per-pipeline work (VAE moments of generation mode's blank masked
image, the teacher's negative-prompt CLIP contexts) is primed first. Besides the ratio the JSON gives the
sampling-only ratio and ``speedup_if_conditioning_free`` = (sample + decode) ratio, the ceiling that no
conditioning speed-up can pass, since decoding is the same work for both models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

if __package__ in (None, ""):  # run as a file: see _script_mode.py
    import _script_mode  # noqa: F401

from student_model_v2.anytext2.config import MODELS_YAML_DIR
from student_model_v2.distillation.lora import DEFAULT_LORA_TARGETS, LORA_TARGET_SETS
from student_model_v2.evaluation.report import write_json
from student_model_v2.training.args import DEFAULT_DATASET

DEFAULT_TINY_YAML = MODELS_YAML_DIR / "anytext2_tiny.yaml"
DTYPE_CHOICES = ["fp32", "fp16", "bf16"]


def _time_samples(dataset, indices: list[int], repeats: int) -> dict:
    for i in indices:
        dataset[i]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        for i in indices:
            dataset[i]
    n = repeats * len(indices)
    return {"cpu_ms": round((time.process_time() - cpu0) * 1000 / n, 2),
            "wall_ms": round((time.perf_counter() - wall0) * 1000 / n, 2)}


def bench_data(args: argparse.Namespace) -> dict:
    import cv2
    import torch

    from student_model_v2.build_lmdb_cache import build_cache
    from student_model_v2.data.anytext_record import RenderOptions
    from student_model_v2.data.dataset import AnyTextDataset

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="anytext_bench_") as tmp:
        common = dict(resolution=args.resolution, font_hint_prob=0.8, mask_img_prob=0.5, seed=0,
                      cache_dir=str(Path(tmp) / "index"))
        online = AnyTextDataset(args.dataset_json, font_hint_randaug=True, **common)
        indices = [i for i in range(len(online)) if online[i]["n_lines"] >= args.min_lines]
        if not indices:
            raise SystemExit(f"error: no sample in {args.dataset_json} has {args.min_lines} usable lines")
        started = time.perf_counter()
        build_cache([args.dataset_json], str(Path(tmp) / "lmdb"), opts=RenderOptions(resolution=args.resolution),
                    font_path=str(online.builder.font.path), num_workers=0, cache_dir=common["cache_dir"],
                    progress=False)
        build_s = time.perf_counter() - started
        plain = AnyTextDataset(args.dataset_json, font_hint_randaug=False, **common)
        cached = AnyTextDataset(args.dataset_json, font_hint_randaug=False, lmdb_path=str(Path(tmp) / "lmdb"),
                                **common)
        return {
            "command": "data",
            "dataset_json": str(args.dataset_json),
            "samples_timed": len(indices),
            "repeats": args.repeats,
            "min_lines": args.min_lines,
            "resolution": args.resolution,
            "threads": 1,
            "online_randaug": _time_samples(online, indices, args.repeats),
            "online_no_randaug": _time_samples(plain, indices, args.repeats),
            "lmdb": _time_samples(cached, indices, args.repeats),
            "lmdb_build_s_per_image": round(build_s / len(online), 4),
            "targets_ms": {"online": 50, "lmdb": 15},
        }


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(loader) -> Iterator:
    """Batches from ``loader``, epoch after epoch (the timed steps may outnumber one epoch's batches)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


H200_DENSE_BF16_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet: 989 TFLOPS dense BF16/FP16 tensor core (1979 sparse)


def _release_memory(device) -> None:
    """Return what a finished or failed try freed: Python garbage, CUDA's cached blocks, glibc's free heap."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_memory(device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on the CPU the kernel's peak-RSS mark (VmHWM)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as handle:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        handle.write("5")


def _peak_memory_gb(device) -> float:
    """Peak since ``_reset_peak_memory``: CUDA ``max_memory_allocated``, or on the CPU the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line: peak RSS cannot be measured on this system")


def _train_argv(args: argparse.Namespace, version: str, tmp: str, batch_size: int) -> list[str]:
    argv = ["--config", args.config, "--resolution", str(args.resolution), "--train_batch_size",
            str(batch_size), "--mixed_precision", args.mixed_precision, "--teacher_dtype",
            args.teacher_dtype, "--output_dir", str(Path(tmp) / version), "--dataset_json",
            *args.dataset_json, "--cache_dir", str(Path(tmp) / "index"), "--train_ratio", "1.0",
            "--val_ratio", "0.0", "--test_ratio", "0.0", "--eval_batches", "0", "--save_steps", "0",
            "--max_train_steps", str(args.warmup + args.steps), "--lora_rank", str(args.lora_rank),
            "--lora_alpha", str(args.lora_rank), "--num_workers", str(args.num_workers),
            "--dataloader_start_method", args.dataloader_start_method, "--persistent_workers", "--lora_targets",
            args.lora_targets]
    if args.teacher_ckpt:
        argv += ["--teacher_ckpt", args.teacher_ckpt]
    if args.lmdb_path:
        argv += ["--lmdb_path", args.lmdb_path, "--no_font_hint_randaug"]
    if args.use_mock_dataset:
        argv += ["--use_mock_dataset", "--mock_size", str(args.mock_size)]
    if args.no_tf32:
        argv += ["--no_tf32"]
    if args.no_fused_adamw:
        argv += ["--no_fused_adamw"]
    return argv


def _train_loader(trainer, batch_size: int):
    """A prepared training loader at ``batch_size`` over the trainer's own data flags (for batch-size tries)."""
    import copy

    from student_model_v2.training.data import build_dataloaders

    flags = copy.copy(trainer.args)
    flags.train_batch_size = batch_size
    return trainer.accelerator.prepare_data_loader(build_dataloaders(flags, eval_samples=0).train)


def _measure(trainer, loader, batch_size: int, args: argparse.Namespace) -> dict:
    """Warm-up, then timed optimizer steps with the loader in the loop; memory, passes and FLOPs of a step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = trainer.accelerator.device
    batches = _endless(loader)
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    _sync(device)
    _reset_peak_memory(device)
    trainer.counter.reset()
    started = time.perf_counter()
    data_wait = 0.0
    for _ in range(args.steps):
        fetch_started = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - fetch_started
        trainer.train_step(batch)
    _sync(device)
    seconds = (time.perf_counter() - started) / args.steps
    peak = _peak_memory_gb(device)
    calls = trainer.counter
    # the first timed step's calls (every step makes the same ones)
    per_step = {name: [[role, rows] for role, rows in recorded[: len(recorded) // args.steps]]
                for name, recorded in (("unet", calls.unet_calls), ("writenet", calls.writenet_calls),
                                       ("vae", calls.vae_calls), ("text_encoder", calls.text_encoder_calls))}
    with FlopCounterMode(display=False) as flop_counter:  # one untimed step
        trainer.train_step(next(batches))
    batches.close()
    flops = flop_counter.get_total_flops()
    params = list(trainer.student.parameters())
    result = {
        "batch_size": batch_size,
        "seconds_per_step": round(seconds, 4),
        "seconds_per_sample": round(seconds / batch_size, 4),
        "samples_per_second": round(batch_size / seconds, 3),
        "data_wait_seconds_per_step": round(data_wait / args.steps, 4),
        "unet_calls_per_step": per_step["unet"],
        "writenet_calls_per_step": per_step["writenet"],
        "vae_calls_per_step": per_step["vae"],
        "text_encoder_calls_per_step": per_step["text_encoder"],
        "frozen_param_gb": round(sum(p.numel() * p.element_size() for p in params if not p.requires_grad) / 2**30, 4),
        "lora_param_mb": round(sum(p.numel() * p.element_size() for p in params if p.requires_grad) / 2**20, 3),
        "lora_parameters": trainer.lora_parameters,
        "optimizer": trainer.optimizer_implementation,
        "peak_memory_gb": round(peak, 3),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "tflop_per_step": round(flops / 1e12, 4),
        "achieved_tflops": round(flops / seconds / 1e12, 3),
    }
    if device.type == "cuda":
        result["model_flops_utilisation"] = round(flops / seconds / (args.peak_tflops * 1e12), 4)
        result["peak_tflops_assumed"] = args.peak_tflops
    return result


def search_max_batch(fits: Callable[[int], bool], cap: int) -> int:
    """Largest batch in [1, cap] for which ``fits`` holds (0 if none), assuming fitting is monotone.

    Doubles from 1 until a batch does not fit or the cap is reached, then bisects between the last
    batch that fit and the first that did not: about 2 log2(answer) tries.
    """
    fit, failed, batch = 0, None, 1
    while failed is None:
        batch = min(batch, cap)
        if not fits(batch):
            failed = batch
        elif batch == cap:
            return batch
        else:
            fit, batch = batch, batch * 2
    while failed - fit > 1:
        middle = (fit + failed) // 2
        if fits(middle):
            fit = middle
        else:
            failed = middle
    return fit


def _try_batch(trainer, batch_size: int, args: argparse.Namespace) -> dict:
    """``--try_steps`` optimizer steps at ``batch_size``: whether they fit, and their peak memory.

    A try does not fit when it raises ``torch.OutOfMemoryError`` (CUDA) or when its peak memory exceeds
    ``--memory_limit_gb``. Everything the try allocated is released before the next one.
    """
    import torch

    device = trainer.accelerator.device
    loader = _train_loader(trainer, batch_size)
    _release_memory(device)
    _reset_peak_memory(device)
    out_of_memory = False
    batches = _endless(loader)
    try:
        for _ in range(args.try_steps):
            trainer.train_step(next(batches))
        _sync(device)
    except torch.OutOfMemoryError:
        out_of_memory = True
    finally:
        batches.close()
    trainer.optimizer.zero_grad(set_to_none=True)
    peak = _peak_memory_gb(device)
    del loader, batches
    _release_memory(device)
    over_limit = args.memory_limit_gb is not None and peak > args.memory_limit_gb
    return {"batch_size": batch_size, "fits": not (out_of_memory or over_limit), "out_of_memory": out_of_memory,
            "peak_memory_gb": round(peak, 3)}


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # how high glibc's dynamic threshold goes on 64-bit systems


def _set_mmap_threshold(size: int) -> None:
    import ctypes

    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: CPU peak memory per try cannot be measured")


@contextlib.contextmanager
def _freed_memory_leaves_the_process(device) -> Iterator[None]:
    """CPU: during the search, glibc serves allocations of 128 KiB and more with mmap, so freed tensors leave the RSS.

    By default glibc raises its mmap threshold as large blocks are freed and then keeps such blocks in
    its heap: after a large try the RSS would stay at that try's peak and every later, smaller try would
    measure it. A fixed 128 KiB threshold makes large frees return to the OS (at the cost of page faults,
    so the timed run afterwards gets a fixed 32 MiB threshold, the top of glibc's dynamic range). Memory
    kept across tries by caches (oneDNN's per-shape primitives, Python's small-block heap) still counts:
    after a larger try failed, a smaller try's CPU peak is an upper bound. On CUDA nothing changes.
    """
    if device.type != "cpu":
        yield
        return
    _set_mmap_threshold(128 * 1024)
    try:
        yield
    finally:
        _set_mmap_threshold(GLIBC_MMAP_THRESHOLD_MAX)


def _find_max_batch(trainer, args: argparse.Namespace) -> dict:
    """The search of ``--find_max_batch`` and the timed run at the batch it found."""
    dataset_size = len(trainer.train_loader.dataset)
    cap = min(args.max_batch, dataset_size)
    trials: list[dict] = []

    def fits(batch_size: int) -> bool:
        trials.append(_try_batch(trainer, batch_size, args))
        return trials[-1]["fits"]

    with _freed_memory_leaves_the_process(trainer.accelerator.device):
        best = search_max_batch(fits, cap)
    if best == 0:
        raise SystemExit(f"error: batch 1 does not fit ({trials[0]}); lower --resolution or raise --memory_limit_gb")
    return {"max_batch": best, "cap": cap, "capped_by": "dataset" if dataset_size < args.max_batch else "--max_batch",
            "memory_limit_gb": args.memory_limit_gb, "trials": trials,
            "at_max_batch": _measure(trainer, _train_loader(trainer, best), best, args)}


def bench_train(args: argparse.Namespace) -> dict:
    import importlib

    from student_model_v2.training.speed import tf32_state
    from student_model_v2.training.trainer import Trainer

    results = {}
    with tempfile.TemporaryDirectory(prefix="anytext_bench_train_") as tmp:
        for version in args.version:
            module = importlib.import_module(f"student_model_v2.train_lcm_anytext_{version}")
            argv = _train_argv(args, version, tmp, 1 if args.find_max_batch else args.batch_size)
            trainer = Trainer(module.build_argument_parser().parse_args(argv), module.OBJECTIVE)
            device = trainer.accelerator.device
            if args.find_max_batch:
                results[version] = _find_max_batch(trainer, args)
            else:
                results[version] = _measure(trainer, trainer.train_loader, args.batch_size, args)
    timed = {v: r["at_max_batch"] if args.find_max_batch else r for v, r in results.items()}
    first = timed[args.version[0]]["seconds_per_step"]
    return {
        "command": "train", "config": args.config, "device": str(device), "resolution": args.resolution,
        "batch_size": "searched" if args.find_max_batch else args.batch_size, "lora_targets": args.lora_targets,
        "mixed_precision": args.mixed_precision, "teacher_dtype": args.teacher_dtype, "tf32": tf32_state(),
        "dataset_json": None if args.use_mock_dataset else args.dataset_json,
        "mock_size": args.mock_size if args.use_mock_dataset else None,
        "lmdb_path": args.lmdb_path or None, "num_workers": args.num_workers,
        "dataloader_start_method": args.dataloader_start_method, "loader_included": True,
        "timed_steps": args.steps, "random_init_teacher": not args.teacher_ckpt, "versions": results,
        "step_time_relative_to_first": {v: round(r["seconds_per_step"] / first, 3) for v, r in timed.items()},
    }


def bench_teacher(args: argparse.Namespace) -> dict:
    """Seconds of the teacher's operations on one batch: conditioning, WriteNet, one UNet eps call."""
    import torch

    from student_model_v2.anytext2.checkpoint import DTYPES, build_random_teacher, load_teacher
    from student_model_v2.data.dataset import MockAnyTextDataset, collate_fn
    from student_model_v2.distillation.conditioning import encode_batch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.teacher_ckpt:
        model = load_teacher(args.config, args.teacher_ckpt, dtype=DTYPES[args.dtype], device=device)
    else:
        model = build_random_teacher(args.config, dtype=DTYPES[args.dtype], device=device)
    dataset = MockAnyTextDataset(args.batch_size, resolution=args.resolution, seed=0)
    batch = collate_fn([dataset[i] for i in range(args.batch_size)])
    x_t = torch.randn(args.batch_size, 4, args.resolution // 8, args.resolution // 8, device=device)
    timings: dict[str, list[float]] = {"encode_conditions": [], "writenet": [], "unet_eps": []}
    with torch.no_grad():
        for repeat in range(args.warmup + args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            encoded = encode_batch(model, batch, "low quality")
            _sync(device)
            t1 = time.perf_counter()
            residuals = model.control_residuals(encoded.cond)
            _sync(device)
            t2 = time.perf_counter()
            model.predict_eps(x_t, 500, encoded.cond, residuals)
            _sync(device)
            t3 = time.perf_counter()
            if repeat >= args.warmup:
                timings["encode_conditions"].append(t1 - t0)
                timings["writenet"].append(t2 - t1)
                timings["unet_eps"].append(t3 - t2)
    return {
        "command": "teacher", "config": args.config, "device": str(device), "dtype": args.dtype,
        "batch_size": args.batch_size, "resolution": args.resolution, "random_init_teacher": model.is_random_init,
        "median_seconds": {k: round(statistics.median_high(v), 4) for k, v in timings.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
    }


class _PassCounter:
    """Wraps ``predict_eps`` and ``control_residuals`` on the model instance to count calls and rows."""

    def __init__(self, model) -> None:
        self.unet_rows: list[int] = []
        self.writenet_rows: list[int] = []
        predict_eps, control_residuals = model.predict_eps, model.control_residuals

        def counted_eps(x_t, *args, **kwargs):
            self.unet_rows.append(int(x_t.shape[0]))
            return predict_eps(x_t, *args, **kwargs)

        def counted_writenet(conditions, *args, **kwargs):
            self.writenet_rows.append(int(conditions.batch_size))
            return control_residuals(conditions, *args, **kwargs)

        model.predict_eps = counted_eps
        model.control_residuals = counted_writenet

    def reset(self) -> None:
        self.unet_rows.clear()
        self.writenet_rows.clear()


def _time_requests(pipe, request, options, warmup: int, repeats: int, counter: _PassCounter) -> dict:
    for _ in range(warmup):
        pipe(request, options)
    runs = []
    for _ in range(repeats):
        counter.reset()
        runs.append(pipe(request, options).timings)
    median = {key: round(statistics.median_high(r[key] for r in runs), 4) for key in runs[0]}
    return {
        "steps": options.resolved_steps(),
        "latency_s": median["total"],
        "median_seconds": median,
        "unet_calls": len(counter.unet_rows),
        "unet_passes": sum(counter.unet_rows) / options.num_images,
        "writenet_calls": len(counter.writenet_rows),
        "writenet_passes": sum(counter.writenet_rows),
    }


def bench_infer(args: argparse.Namespace) -> dict:
    from student_model_v2.anytext2.checkpoint import DTYPES
    from student_model_v2.distillation.lora import add_lora
    from student_model_v2.inference.pipeline import AnyText2Pipeline, SamplingOptions, TextRequest

    pipe = AnyText2Pipeline.from_pretrained(args.config, args.teacher_ckpt or None, device=args.device or None,
                                            dtype=DTYPES[args.dtype])
    counter = _PassCounter(pipe.model)
    r = args.resolution
    request = TextRequest(prompt='a shop sign that reads "Hello", "World"', width=r, height=r,
                          positions=[[r // 16, r // 8, r - r // 16, r // 2 - r // 16],
                                     [r // 8, r // 2 + r // 16, r - r // 8, r - r // 8]])
    common = dict(num_images=args.num_images, seed=args.seed)
    # A pipeline encodes the blank masked image and the negative prompt once; prime both so that every
    # timed request, teacher or student, is a steady-state request even with --warmup 0.
    pipe(request, SamplingOptions(sampler="teacher", steps=1, guidance_scale=7.5, num_images=1, seed=args.seed))
    teacher = _time_requests(pipe, request, SamplingOptions(sampler="teacher", steps=20, guidance_scale=7.5, **common),
                             args.warmup, args.repeats, counter)
    with tempfile.TemporaryDirectory(prefix="anytext_bench_lora_") as tmp:
        lora_path = args.lora_path
        if not lora_path:
            peft_model = add_lora(pipe.model, args.lora_rank, args.lora_rank)
            peft_model.save_pretrained(tmp)
            pipe.model = peft_model.unload()
            lora_path = tmp
        pipe.load_lora(lora_path, merge=True)
    student = _time_requests(pipe, request, SamplingOptions(sampler="student", steps=4, **common),
                             args.warmup, args.repeats, counter)
    passes = {name: r["unet_passes"] + r["writenet_passes"] for name, r in (("teacher", teacher), ("student", student))}
    pass_ratio = passes["teacher"] / passes["student"]
    speedup = teacher["latency_s"] / student["latency_s"]
    sampling_speedup = teacher["median_seconds"]["sample"] / student["median_seconds"]["sample"]
    # What the ratio could reach if conditioning (rendering, OCR, CLIP, VAE encode) cost nothing: sampling
    # and decoding are then all that is left, and the shared decode still dilutes the ratio.
    seconds = {name: r["median_seconds"] for name, r in (("teacher", teacher), ("student", student))}
    ceiling = ((seconds["teacher"]["sample"] + seconds["teacher"]["decode"])
               / (seconds["student"]["sample"] + seconds["student"]["decode"]))
    return {
        "command": "infer", "config": args.config, "device": str(pipe.device), "dtype": args.dtype,
        "random_init_teacher": pipe.model.is_random_init,
        "student_lora": args.lora_path or f"fresh rank {args.lora_rank}",
        "resolution": r, "num_images": args.num_images, "text_lines": 2, "seed": args.seed,
        "warmup": args.warmup, "repeats": args.repeats,
        "teacher": teacher, "student": student,
        "speedup_end_to_end": round(speedup, 3),
        "speedup_sampling_only": round(sampling_speedup, 3),
        "speedup_if_conditioning_free": round(ceiling, 3),
        "pass_count_ratio": round(pass_ratio, 3),
        "speedup_over_pass_ratio": round(speedup / pass_ratio, 3),
        "sampling_only_over_pass_ratio": round(sampling_speedup / pass_ratio, 3),
        "conditioning_free_over_pass_ratio": round(ceiling / pass_ratio, 3),
        "student_fixed_cost_share": round(1 - seconds["student"]["sample"] / seconds["student"]["total"], 3),
        "target_speedup_over_pass_ratio": 0.85,
        "meets_target": speedup / pass_ratio >= 0.85,
        "target_reachable_with_free_conditioning": ceiling / pass_ratio >= 0.85,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m student_model_v2.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="per-sample CPU cost of the data pipeline (online vs LMDB)")
    data.add_argument("--dataset_json", default=DEFAULT_DATASET)
    data.add_argument("--min_lines", type=int, default=5, help="only time samples with this many lines")
    data.add_argument("--repeats", type=int, default=3, help="timed passes over the selected samples")
    data.add_argument("--resolution", type=int, default=512)
    data.set_defaults(func=bench_data)
    train = sub.add_parser("train", help="per-step cost and model passes of the training versions")
    train.add_argument("--version", nargs="+", default=["v2_4"], choices=["v2", "v2_2", "v2_3", "v2_4", "v2_5"])
    train.add_argument("--config", default=str(DEFAULT_TINY_YAML))
    train.add_argument("--teacher_ckpt", default="")
    train.add_argument("--resolution", type=int, default=64)
    train.add_argument("--batch_size", type=int, default=2)
    train.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    train.add_argument("--warmup", type=int, default=1)
    train.add_argument("--lora_rank", type=int, default=64)
    train.add_argument("--lora_targets", choices=LORA_TARGET_SETS, default=DEFAULT_LORA_TARGETS)
    train.add_argument("--dataset_json", nargs="+", default=[DEFAULT_DATASET], help="training data (all of it is used)")
    train.add_argument("--lmdb_path", default="", help="LMDB render cache for --dataset_json (font-hint randaug off)")
    train.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (persistent)")
    train.add_argument("--dataloader_start_method", choices=["fork", "spawn", "forkserver"], default="fork")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    train.add_argument("--teacher_dtype", choices=DTYPE_CHOICES, default="fp32")
    train.add_argument("--use_mock_dataset", action="store_true",
                       help="synthetic samples instead of --dataset_json (any number: see --mock_size)")
    train.add_argument("--mock_size", type=int, default=256, help="samples of --use_mock_dataset")
    train.add_argument("--no_tf32", action="store_true", help="float32 matmuls/convolutions without TF32 (CUDA)")
    train.add_argument("--no_fused_adamw", action="store_true", help="torch's default AdamW instead of the fused one")
    train.add_argument("--find_max_batch", action="store_true",
                       help="find the largest batch that fits (doubling, then bisection; --batch_size is ignored) "
                       "and time --steps steps at it")
    train.add_argument("--max_batch", type=int, default=512,
                       help="largest batch --find_max_batch tries (also capped by the training set's size)")
    train.add_argument("--memory_limit_gb", type=float, default=None,
                       help="--find_max_batch: a batch whose peak memory exceeds this does not fit (CUDA: "
                       "max_memory_allocated; CPU: the process's peak RSS); CUDA also stops at out-of-memory")
    train.add_argument("--try_steps", type=int, default=2,
                       help="--find_max_batch: optimizer steps per tried batch (the first also allocates AdamW's state)")
    train.add_argument("--peak_tflops", type=float, default=H200_DENSE_BF16_TFLOPS,
                       help="the GPU's dense peak for the model FLOP utilisation estimate (default: H200 bf16)")
    train.set_defaults(func=bench_train)
    teacher = sub.add_parser("teacher", help="teacher forward cost: conditioning, WriteNet, one UNet call")
    teacher.add_argument("--config", default=str(DEFAULT_TINY_YAML))
    teacher.add_argument("--teacher_ckpt", default="")
    teacher.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
    teacher.add_argument("--device", default="")
    teacher.add_argument("--batch_size", type=int, default=2)
    teacher.add_argument("--resolution", type=int, default=64)
    teacher.add_argument("--repeats", type=int, default=5)
    teacher.add_argument("--warmup", type=int, default=2)
    teacher.set_defaults(func=bench_teacher)
    infer = sub.add_parser("infer", help="end-to-end inference latency: teacher 20-step CFG vs student 4-step LCM")
    infer.add_argument("--config", default=str(DEFAULT_TINY_YAML))
    infer.add_argument("--teacher_ckpt", default="")
    infer.add_argument("--lora_path", default="", help="student adapter; default a fresh rank --lora_rank LoRA")
    infer.add_argument("--lora_rank", type=int, default=64)
    infer.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
    infer.add_argument("--device", default="")
    infer.add_argument("--resolution", type=int, default=64)
    infer.add_argument("--num_images", type=int, default=4)
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--repeats", type=int, default=3, help="timed requests per model (median reported)")
    infer.add_argument("--warmup", type=int, default=1)
    infer.set_defaults(func=bench_infer)
    for command in sub.choices.values():
        command.add_argument("--json", metavar="PATH", default=None,
                             help="also write the JSON result to PATH (folders are created)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], dict] = args.func
    result = func(args)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
