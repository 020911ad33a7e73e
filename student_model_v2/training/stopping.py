"""Graceful stop on SIGTERM: finish the optimizer step, checkpoint, stop the data workers, then exit.

Slurm preemption and ``oom_guard.py`` send SIGTERM to the whole process group, DataLoader workers
included. The workers ignore it (``training/data.py`` worker init), so the main process can still fetch
the batches of the current accumulation window; it then writes a checkpoint, shuts the workers down
itself and exits with :data:`SIGTERM_EXIT_CODE` (128 + 15, what a SIGTERM death reports, so schedulers
that requeue on 143 keep working).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from torch.utils.data import DataLoader

SIGTERM_EXIT_CODE = 143
logger = logging.getLogger("student_model_v2.train")


class StopRequest:
    """Set by SIGTERM; the training loop polls it after every optimizer step."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested, self.signum = True, signum
        logger.warning("received signal %d: will checkpoint after the current optimizer step", signum)


def shutdown_workers(*loaders: Any) -> None:
    """Stop the worker processes of (accelerate-prepared) loaders now, persistent ones included.

    Workers ignore SIGTERM, so they must not be left to Python's exit: ``multiprocessing`` would
    SIGTERM its daemon children and then wait for them forever. A persistent loader keeps its
    iterator (and workers) in ``DataLoader._iterator``; shutting that iterator down joins them.
    """
    for loader in loaders:
        if loader is None:
            continue
        base = getattr(loader, "base_dataloader", loader)
        if not isinstance(base, DataLoader):
            continue
        iterator = base._iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        base._iterator = None
