"""Data loaders for training: dataset from flags, deterministic split, resumable order.

The training order is a seeded permutation per epoch (``EpochSampler``), and every sample's random
augmentation is drawn from (seed, epoch, index) by the dataset, so a run resumed at (epoch, batch)
sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..data.dataset import AnyTextDataset, MockAnyTextDataset, collate_fn, make_splits


class EpochSampler(Sampler[int]):
    """Shuffled order that depends only on (seed, epoch); ``set_epoch`` also reseeds augmentations.

    The trainer sets the epoch through the accelerate-prepared loader (``loader.set_epoch``), which
    otherwise counts its own iterations and would restart at 0 after a resume.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        base = self.dataset.dataset if isinstance(self.dataset, Subset) else self.dataset
        if hasattr(base, "set_epoch"):
            base.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(len(self.dataset)))
        generator = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
        return iter(torch.randperm(len(self.dataset), generator=generator).tolist())

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
        cache_dir=args.cache_dir or None, **options,
    )


def _worker_init(num_threads: int):
    def init(_worker_id: int) -> None:
        import cv2

        # SIGTERM/SIGINT reach the whole process group; the main process checkpoints and then stops the
        # workers itself (training/stopping.py), so a worker must not die under it mid-window.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(num_threads)
        cv2.setNumThreads(num_threads)

    return init


def build_dataloaders(args: argparse.Namespace, eval_samples: int | None = None) -> Loaders:
    """Train/val/test loaders over a deterministic split (``--train/val/test_ratio``, ``--split_seed``).

    They are not sharded here: ``accelerator.prepare`` splits them across processes. ``eval_samples``
    cuts val/test to their first samples (``eval_batches x batch x world``), so an evaluation reads its
    loader to the end: breaking out of an accelerate-prepared loader would leave it registered as the
    active one and break gradient accumulation (0 = no val/test loaders at all). The cut is a Subset of
    the split's Subset, so the eval sampler's ``set_epoch`` never re-seeds the dataset training shares.
    """
    dataset = build_dataset(args)
    splits = make_splits(dataset, (args.train_ratio, args.val_ratio, args.test_ratio), args.split_seed)
    train_sampler = EpochSampler(splits["train"], args.seed)
    common = dict(
        batch_size=args.train_batch_size, collate_fn=collate_fn, num_workers=args.num_workers,
        pin_memory=args.pin_memory,
    )
    if args.num_workers > 0:
        common.update(prefetch_factor=args.prefetch_factor, persistent_workers=args.persistent_workers,
                      worker_init_fn=_worker_init(args.worker_num_threads))
    train = DataLoader(splits["train"], sampler=train_sampler, drop_last=False, **common)

    def eval_loader(name: str) -> DataLoader | None:
        subset = splits[name]
        if eval_samples is not None:
            subset = Subset(subset, range(min(len(subset), eval_samples)))
        if len(subset) == 0:
            return None
        return DataLoader(subset, sampler=EpochSampler(subset, args.seed, shuffle=False), **common)

    return Loaders(train, eval_loader("val"), eval_loader("test"), DatasetStats())
