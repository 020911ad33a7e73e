"""Benchmarks, one subcommand each, every one printing a JSON object on stdout (``--json PATH`` also
writes it to a file).

    python -m student_model_v2.bench data [--dataset_json ...] [--min_lines 5] [--repeats 3]
    python -m student_model_v2.bench train --version v2_4 [--config ...] [--batch_size 2] [--steps 5] [--num_workers 2]
    python -m student_model_v2.bench train --find_max_batch [--max_batch 64] [--memory_limit_gb 100]
    python -m student_model_v2.bench teacher [--config models_yaml/anytext2_sd15.yaml] [--dtype bf16]
    python -m student_model_v2.bench infer [--config ...] [--resolution 64] [--num_images 4] [--repeats 5] [--compile] [--channels_last]

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
``--no_tf32``, ``--no_fused_adamw``, ``--compile [--compile_mode]`` and ``--channels_last`` pass the
trainer's flags of the same names through (``--warmup`` steps absorb the compiling).

``infer``: one inference request (glyph rendering, OCR/CLIP/VAE-encode conditioning, sampling, VAE
decode; same request, image count and seed) for the teacher (20 DDIM steps, CFG 7.5, cond+uncond rows
in one UNet call) and the student (4 LCM steps, merged LoRA), with the cost model that says what their
sampling times should be. In the same run it times each pass alone (``pass_seconds``): the UNet at the
student's batch (B rows) and at the teacher's (2B), each as the mean of as many back-to-back calls as its
loop makes (4 and 20), the WriteNet at the rows each runs it with, the VAE
decode, and the conditioning by part; model FLOPs per pass are counted once (FlopCounterMode, eager) and
give achieved TFLOP/s. From the passes the pipelines actually make (counted by wrapping the model's
methods) it predicts the sampling times (teacher 20 x UNet(2B) + its WriteNet call, student 4 x UNet(B)
+ 1 WriteNet) and their ratio; ``sampling_only_over_pass_ratio`` = measured sampling ratio / predicted
ratio is 1 when the loops cost exactly their passes, and ``sampling_overhead_s`` is what each loop adds.
``pass_count_ratio`` counts rows (40 + 2 vs 4 + 1 per image = 8.4), as if a row cost the same at any
batch size; ``sampling_only_over_pass_count_ratio`` keeps that older comparison. Requests and
single passes are timed round-robin (one of each per round, medians), so load on a shared machine hits
them alike. The teacher and the student are two pipelines of the same architecture; without
``--lora_path`` the student is a freshly initialised rank-64 LoRA, merged (the cost does not depend on
its values). A counted request per pipeline first primes its once-per-pipeline caches (blank-image VAE
moments, negative-prompt CLIP contexts). ``--compile``/``--channels_last`` apply the fast paths to both;
the warm-up round compiles.
``student_conditioning_share`` is the student's (prepare + encode) share of its request.
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

from student_model_v2.anytext2.acceleration import COMPILE_MODES
from student_model_v2.anytext2.config import MODELS_YAML_DIR
from student_model_v2.distillation.lora_targets import DEFAULT_LORA_TARGETS, LORA_TARGET_SETS
from student_model_v2.evaluation.report import write_json
from student_model_v2.training.args import DEFAULT_DATASET
from student_model_v2.training.speed import TRAINING_COMPILE_MODES

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
    if args.compile:
        argv += ["--compile", "--compile_mode", args.compile_mode]
    if args.channels_last:
        argv += ["--channels_last"]
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


def _counted_passes(pipe, request, options) -> dict:
    """UNet and WriteNet calls (and rows) of one request, counted by wrapping the model's methods."""
    counter = _PassCounter(pipe.model)
    pipe(request, options)
    del pipe.model.predict_eps, pipe.model.control_residuals   # back to the class methods
    return {"unet_calls": len(counter.unet_rows), "unet_rows": sorted(set(counter.unet_rows)),
            "unet_passes": sum(counter.unet_rows) / options.num_images,
            "writenet_calls": len(counter.writenet_rows), "writenet_rows": sorted(set(counter.writenet_rows)),
            "writenet_passes": sum(counter.writenet_rows)}


def _pass_calls(pipe, request, num_images: int, seed: int) -> dict[str, tuple[int, Callable[[], object]]]:
    """The request's passes one by one, at the rows the pipeline runs them with: (rows, call) by name.

    Conditioning: glyph rendering, OCR/style line embeddings, CLIP, the masked image's latent as a request
    pays it (generation mode: cached VAE moments) and uncached (edit mode). Sampling: the UNet at the
    student's batch and at the teacher's cond+uncond batch, the WriteNet at each, then the VAE decode.
    """
    import torch

    from student_model_v2.anytext2.model import concat_conditions
    from student_model_v2.distillation.samplers import repeat_conditions

    model, device = pipe.model, pipe.device
    conditioning = pipe.prepare(request)
    masked_x = pipe._masked_latent(conditioning, torch.Generator().manual_seed(seed))
    text_info = conditioning.text_info(masked_x, device)
    captions = [conditioning.image_caption], [conditioning.text_caption]
    with torch.no_grad():
        lines = model.line_embeddings(text_info)
        cond, uncond = model.encode_conditions(text_info, *captions, conditioning.negative_caption)
    both = concat_conditions([cond, uncond])
    latents = torch.randn(num_images, model.config.latent_channels, *masked_x.shape[-2:],
                          generator=torch.Generator().manual_seed(seed)).to(device)
    student_rows = (repeat_conditions(cond, num_images),
                    [r.repeat_interleave(num_images, dim=0) for r in model.control_residuals(cond)])
    teacher_rows = (repeat_conditions(both, num_images),
                    [r.repeat_interleave(num_images, dim=0) for r in model.control_residuals(both)])
    t_student = torch.full((num_images,), 499, device=device)
    t_teacher = torch.full((2 * num_images,), 499, device=device)
    doubled = torch.cat([latents, latents])
    return {
        "glyph_rendering": (1, lambda: pipe.prepare(request)),
        "ocr_style_embedding": (1, lambda: model.line_embeddings(text_info)),
        "clip": (1, lambda: model.cond_stage_model.encode(*captions, lines.per_sample)),
        "vae_encode_masked_image": (1, lambda: pipe._masked_latent(conditioning, torch.Generator().manual_seed(seed))),
        "vae_encode_uncached": (1, lambda: model.vae_encode(conditioning.masked_image, generator=torch.Generator())),
        "unet_student": (num_images, lambda: model.predict_eps(latents, t_student, *student_rows)),
        "unet_teacher": (2 * num_images, lambda: model.predict_eps(doubled, t_teacher, *teacher_rows)),
        "writenet_student": (cond.batch_size, lambda: model.control_residuals(cond)),
        "writenet_teacher": (both.batch_size, lambda: model.control_residuals(both)),
        "vae_decode": (num_images, lambda: model.vae_decode(latents)),
    }


CONDITIONING_PARTS = ("glyph_rendering", "ocr_style_embedding", "clip", "vae_encode_masked_image")


def bench_infer(args: argparse.Namespace) -> dict:
    from student_model_v2.anytext2.checkpoint import DTYPES
    from student_model_v2.distillation.lora import add_lora
    from student_model_v2.evaluation.pass_costs import achieved_tflops, count_flops, interleaved_median_seconds
    from student_model_v2.inference.pipeline import AnyText2Pipeline, SamplingOptions, TextRequest

    def load() -> AnyText2Pipeline:
        return AnyText2Pipeline.from_pretrained(args.config, args.teacher_ckpt or None, device=args.device or None,
                                                dtype=DTYPES[args.dtype])

    if args.compile and args.warmup < 1:
        raise SystemExit("error: --compile needs --warmup 1 or more (the first round compiles the graphs)")
    teacher_pipe, student_pipe = load(), load()
    unet_calls = {"unet_teacher": 20, "unet_student": 4}   # timed as the loops make them: back to back
    with tempfile.TemporaryDirectory(prefix="anytext_bench_lora_") as tmp:
        lora_path = args.lora_path
        if not lora_path:
            peft_model = add_lora(student_pipe.model, args.lora_rank, args.lora_rank)
            peft_model.save_pretrained(tmp)
            student_pipe.model = peft_model.unload()
            lora_path = tmp
        student_pipe.load_lora(lora_path, merge=True)
    device = student_pipe.device
    r = args.resolution
    request = TextRequest(prompt='a shop sign that reads "Hello", "World"', width=r, height=r,
                          positions=[[r // 16, r // 8, r - r // 16, r // 2 - r // 16],
                                     [r // 8, r // 2 + r // 16, r - r // 8, r - r // 8]])
    common = dict(num_images=args.num_images, seed=args.seed)
    teacher_options = SamplingOptions(sampler="teacher", steps=20, guidance_scale=7.5, **common)
    student_options = SamplingOptions(sampler="student", steps=4, **common)
    passes = {"teacher": _counted_passes(teacher_pipe, request, teacher_options),
              "student": _counted_passes(student_pipe, request, student_options)}
    # Model FLOPs per pass, counted once on the eager modules (the counter would distort any timing).
    calls = _pass_calls(student_pipe, request, args.num_images, args.seed)
    flops = {name: count_flops(call) for name, (_, call) in calls.items() if name != "glyph_rendering"}
    if args.compile or args.channels_last:
        for pipe in (teacher_pipe, student_pipe):
            pipe.accelerate(compile=args.compile, compile_mode=args.compile_mode, channels_last=args.channels_last)

    runs: dict[str, list[dict]] = {"teacher": [], "student": []}
    def back_to_back(call: Callable[[], object], times: int) -> Callable[[], object]:
        return lambda: [call() for _ in range(times)]

    timed = {name: back_to_back(call, unet_calls.get(name, 1)) for name, (_, call) in calls.items()}
    timed["teacher_request"] = lambda: runs["teacher"].append(teacher_pipe(request, teacher_options).timings)
    timed["student_request"] = lambda: runs["student"].append(student_pipe(request, student_options).timings)
    # Requests and single passes take turns, so load on a shared machine moves all of them alike. The counted
    # requests above primed the pipelines' once-per-pipeline caches; warm-up rounds compile the graphs.
    seconds = interleaved_median_seconds(timed, device, warmup=args.warmup, repeats=args.repeats)
    seconds.update({name: seconds[name] / times for name, times in unet_calls.items()})

    def stages(name: str) -> dict:
        timed_runs = runs[name][-args.repeats:]
        return {key: round(statistics.median(run[key] for run in timed_runs), 4) for key in timed_runs[0]}

    models = {name: {"steps": options.resolved_steps(), **passes[name], "median_seconds": stages(name)}
              for name, options in (("teacher", teacher_options), ("student", student_options))}
    for name in models:
        models[name]["latency_s"] = models[name]["median_seconds"]["total"]
    pass_seconds = {name: {"rows": rows, "seconds": round(seconds[name], 5), "gflops": round(flops[name] / 1e9, 3),
                           "achieved_tflops_per_s": round(achieved_tflops(flops[name], seconds[name]), 4)}
                    for name, (rows, _) in calls.items() if name != "glyph_rendering"}
    pass_seconds["glyph_rendering"] = {"rows": 1, "seconds": round(seconds["glyph_rendering"], 5)}
    predicted = {
        "teacher": (passes["teacher"]["unet_calls"] * seconds["unet_teacher"]
                    + passes["teacher"]["writenet_calls"] * seconds["writenet_teacher"]),
        "student": (passes["student"]["unet_calls"] * seconds["unet_student"]
                    + passes["student"]["writenet_calls"] * seconds["writenet_student"]),
    }
    sample = {name: models[name]["median_seconds"]["sample"] for name in models}
    total = {name: models[name]["median_seconds"]["total"] for name in models}
    decode = {name: models[name]["median_seconds"]["decode"] for name in models}
    predicted_ratio = predicted["teacher"] / predicted["student"]
    sampling_speedup = sample["teacher"] / sample["student"]
    pass_count = {name: p["unet_passes"] + p["writenet_passes"] for name, p in passes.items()}
    pass_count_ratio = pass_count["teacher"] / pass_count["student"]
    student_conditioning = models["student"]["median_seconds"]["prepare"] + models["student"]["median_seconds"]["encode"]
    return {
        "command": "infer", "config": args.config, "device": str(device), "dtype": args.dtype,
        "random_init_teacher": student_pipe.model.is_random_init,
        "student_lora": args.lora_path or f"fresh rank {args.lora_rank}",
        "compile": args.compile, "compile_mode": args.compile_mode if args.compile else None,
        "channels_last": args.channels_last,
        "resolution": r, "num_images": args.num_images, "text_lines": 2, "seed": args.seed,
        "warmup": args.warmup, "repeats": args.repeats,
        "teacher": models["teacher"], "student": models["student"],
        "pass_seconds": pass_seconds,
        "predicted_sampling_seconds": {name: round(value, 4) for name, value in predicted.items()},
        "predicted_sampling_ratio": round(predicted_ratio, 3),
        "speedup_sampling_only": round(sampling_speedup, 3),
        "sampling_only_over_pass_ratio": round(sampling_speedup / predicted_ratio, 3),
        "sampling_overhead_s": {name: round(sample[name] - predicted[name], 4) for name in models},
        "speedup_end_to_end": round(total["teacher"] / total["student"], 3),
        "speedup_if_conditioning_free": round((sample["teacher"] + decode["teacher"])
                                              / (sample["student"] + decode["student"]), 3),
        "pass_count_ratio": round(pass_count_ratio, 3),
        "sampling_only_over_pass_count_ratio": round(sampling_speedup / pass_count_ratio, 3),
        "student_conditioning_share": round(student_conditioning / total["student"], 3),
        "student_conditioning_parts_s": {name: round(seconds[name], 5) for name in CONDITIONING_PARTS},
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
    train.add_argument("--compile", action="store_true",
                       help="the trainer's --compile (UNet and WriteNet); --warmup steps absorb the compiling")
    train.add_argument("--compile_mode", choices=TRAINING_COMPILE_MODES, default="default")
    train.add_argument("--channels_last", action="store_true", help="the trainer's --channels_last")
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
    infer = sub.add_parser("infer", help="inference latency and its cost model: teacher 20-step CFG vs student 4-step LCM")
    infer.add_argument("--config", default=str(DEFAULT_TINY_YAML))
    infer.add_argument("--teacher_ckpt", default="")
    infer.add_argument("--lora_path", default="", help="student adapter; default a fresh rank --lora_rank LoRA")
    infer.add_argument("--lora_rank", type=int, default=64)
    infer.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
    infer.add_argument("--device", default="")
    infer.add_argument("--resolution", type=int, default=64)
    infer.add_argument("--num_images", type=int, default=4)
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--repeats", type=int, default=5, help="timed rounds: each request and pass once per round (medians)")
    infer.add_argument("--warmup", type=int, default=1, help="untimed rounds (--compile needs one: it compiles)")
    infer.add_argument("--compile", action="store_true", help="torch.compile UNet, WriteNet and VAE decoder (both models)")
    infer.add_argument("--compile_mode", choices=COMPILE_MODES, default="default")
    infer.add_argument("--channels_last", action="store_true", help="channels-last UNet, WriteNet and VAE decoder")
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
