"""Data loaders for training: dataset from flags, deterministic split, resumable order, safe workers.

The training order is a seeded permutation per epoch (``EpochSampler``), and every sample's random
augmentation is drawn from (seed, epoch, index) by the dataset, so a run resumed at (epoch, batch)
sees exactly the batches an uninterrupted run would have seen — with any number of workers, since the
sampler hands the epoch to the dataset with every index (persistent workers never see ``set_epoch``).

Workers (``--num_workers > 0``), under ``--dataloader_start_method`` fork (default), spawn or forkserver:

* OpenCV's thread count is set in the main process before the dataset is built. Once OpenCV's thread
  pool has run, ``cv2.setNumThreads`` in a forked child deadlocks (the pool's threads do not exist in
  the child), so a forked worker inherits the count and only spawn/forkserver workers set it.
* Workers ignore SIGTERM and SIGINT: Slurm, ``oom_guard.py`` and Ctrl-C signal the whole process
  group, and the main process must be able to checkpoint before it shuts its workers down. Since
  multiprocessing's exit handler stops leftover (e.g. persistent) workers with SIGTERM and then joins
  them without a limit, the main process kills its remaining workers at exit first
  (:func:`_kill_workers_at_exit`), or every run with persistent workers would hang at exit.
* Per-worker seeds: torch seeds ``random``, numpy's global RNG and torch in each worker from the
  loader's generator (seeded from ``--seed`` here); the samples themselves do not depend on which
  worker draws them (their RNG is per (seed, epoch, index)).
* LMDB environments are opened per process on first read and closed before every fork
  (``data/lmdb_glyph_cache.py``), so no worker inherits one.
* A worker that dies (killed, OOM, crashed) is reported by torch's worker-status check, which polls
  every 5 seconds: "DataLoader worker (pid N) exited unexpectedly" / "is killed by signal: Killed". A
  worker that hangs is turned into a dead one by :class:`HangWatchdog`: a batch that takes longer than
  ``--dataloader_timeout`` seconds dumps the worker's Python stack to stderr and exits it. (DataLoader's
  own ``timeout`` is not used: with it set, torch waits that long before it notices a dead worker.)
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import multiprocessing
import multiprocessing.util
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..data.dataset import AnyTextDataset, EpochSubset, MockAnyTextDataset, collate_fn, make_splits


class EpochSampler(Sampler[tuple[int, int]]):
    """``(epoch, index)`` items in an order that depends only on (seed, epoch).

    The trainer sets the epoch through the accelerate-prepared loader (``loader.set_epoch``), which
    otherwise counts its own iterations and would restart at 0 after a resume. The epoch travels with
    each index to the dataset (an :class:`~..data.dataset.EpochSubset`), which draws that sample's
    augmentation from it. Unshuffled (evaluation) samplers always pass epoch 0: every evaluation sees
    the same samples with the same draws, so their losses are comparable.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self.shuffle:
            return iter([(0, i) for i in range(len(self.dataset))])
        generator = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
        return iter([(self.epoch, i) for i in torch.randperm(len(self.dataset), generator=generator).tolist()])

    def __len__(self) -> int:
        return len(self.dataset)


@dataclass
class DatasetStats:
    """Skipped or repaired samples and lines seen in this process's batches (from ``data_issues``)."""

    counts: Counter = field(default_factory=Counter)

    def update(self, issues: dict[str, int] | None) -> None:
        if issues:
            self.counts.update(issues)

    def skipped_total(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("sample."))

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader | None
    test: DataLoader | None
    stats: DatasetStats


def build_dataset(args: argparse.Namespace) -> Dataset:
    """The dataset the flags describe (mock or JSON files, optionally with the LMDB render cache)."""
    options = dict(
        resolution=args.resolution, max_lines=args.max_lines, max_chars=args.max_chars, font_path=args.font_path,
        font_dir=args.font_dir or None,
        mask_img_prob=args.mask_img_prob, font_hint_prob=args.font_hint_prob,
        font_hint_randaug=not args.no_font_hint_randaug, seed=args.seed,
    )
    if args.use_mock_dataset:
        return MockAnyTextDataset(args.mock_size, **options)
    return AnyTextDataset(
        args.dataset_json, wm_thresh=args.wm_thresh, lmdb_path=args.lmdb_path or None,
        cache_dir=args.cache_dir or None, lmdb_mismatch=args.lmdb_mismatch, **options,
    )


class HangWatchdog(Dataset):
    """The loader's dataset, with a deadline per batch inside DataLoader workers.

    A batch that takes longer than ``seconds`` in a worker (a deadlock in native code, a stuck network
    filesystem) makes ``faulthandler`` print that worker's Python stack and exit it with status 1; the
    main process then reports the dead worker within seconds instead of waiting forever. In the main
    process (``num_workers`` 0) nothing is armed.
    """

    def __init__(self, dataset: Dataset, seconds: float) -> None:
        self.dataset = dataset
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list) -> list:
        armed = self.seconds > 0 and get_worker_info() is not None
        if armed:
            # fd 2 itself: sys.stderr may be replaced by an object without a file descriptor
            faulthandler.dump_traceback_later(self.seconds, exit=True, file=2)
        try:
            fetch = getattr(self.dataset, "__getitems__", None)
            return fetch(items) if fetch is not None else [self.dataset[i] for i in items]
        finally:
            if armed:
                faulthandler.cancel_dump_traceback_later()


def worker_init(worker_id: int, num_threads: int, start_method: str) -> None:
    """Runs first in every DataLoader worker (module level, so spawn can pickle it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(num_threads)
    if start_method != "fork":
        cv2.setNumThreads(num_threads)


def _kill_workers_at_exit() -> None:
    """SIGKILL this process's remaining daemonic children (DataLoader workers ignore SIGTERM).

    Registered as a multiprocessing finalizer with an exit priority, which multiprocessing's exit handler
    runs before it terminates and joins the children (whatever the order of ``atexit`` registrations).
    torch's SIGCHLD handler would raise "worker killed" at the first kill and abort this loop, so it is
    reset first: at exit the workers' deaths are expected.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    for child in workers:
        child.kill()
    for child in workers:
        child.join(5)


_exit_handler_registered = False


def worker_options(args: argparse.Namespace) -> dict:
    """DataLoader keywords for ``--num_workers > 0`` (empty for 0: everything runs in the main process).

    Call before the dataset is built: it sets OpenCV's thread count in this process (see the module
    docstring for why a forked worker must inherit it).
    """
    if args.num_workers <= 0:
        return {}
    if args.dataloader_timeout < 0:
        raise ValueError(f"--dataloader_timeout must be >= 0, got {args.dataloader_timeout}")
    cv2.setNumThreads(args.worker_num_threads)
    global _exit_handler_registered
    if not _exit_handler_registered:
        multiprocessing.util.Finalize(None, _kill_workers_at_exit, exitpriority=100)
        _exit_handler_registered = True
    return dict(
        prefetch_factor=args.prefetch_factor, persistent_workers=args.persistent_workers,
        multiprocessing_context=multiprocessing.get_context(args.dataloader_start_method),
        worker_init_fn=functools.partial(worker_init, num_threads=args.worker_num_threads,
                                         start_method=args.dataloader_start_method),
        generator=torch.Generator().manual_seed(args.seed),
    )


def build_dataloaders(args: argparse.Namespace, eval_samples: int | None = None) -> Loaders:
    """Train/val/test loaders over a deterministic split (``--train/val/test_ratio``, ``--split_seed``).

    They are not sharded here: ``accelerator.prepare`` splits them across processes. ``eval_samples``
    cuts val/test to their first samples (``eval_batches x batch x world``), so an evaluation reads its
    loader to the end: breaking out of an accelerate-prepared loader would leave it registered as the
    active one and break gradient accumulation (0 = no val/test loaders at all). The cut keeps each split's
    first samples, and evaluation samplers pass epoch 0, so every evaluation sees the same samples and draws.
    """
    workers = worker_options(args)
    dataset = build_dataset(args)
    splits = make_splits(dataset, (args.train_ratio, args.val_ratio, args.test_ratio), args.split_seed)
    train_sampler = EpochSampler(splits["train"], args.seed)
    common = dict(
        batch_size=args.train_batch_size, collate_fn=collate_fn, num_workers=max(0, args.num_workers),
        pin_memory=bool(args.pin_memory), **workers,
    )
    def watched(subset: Dataset) -> Dataset:
        return HangWatchdog(subset, args.dataloader_timeout) if args.num_workers > 0 else subset

    train = DataLoader(watched(splits["train"]), sampler=train_sampler, drop_last=False, **common)

    def eval_loader(name: str) -> DataLoader | None:
        subset = splits[name]
        if eval_samples is not None:
            subset = EpochSubset(subset.dataset, subset.indices[:eval_samples])
        if len(subset) == 0:
            return None
        return DataLoader(watched(subset), sampler=EpochSampler(subset, args.seed, shuffle=False), **common)

    return Loaders(train, eval_loader("val"), eval_loader("test"), DatasetStats())
