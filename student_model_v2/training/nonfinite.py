"""Skip optimizer updates whose loss (on any rank) or gradient is NaN/Inf, and stop when they persist.

Every rank records whether a micro-batch loss of the current accumulation window was non-finite; at
the window's boundary one all-reduce (shared with the trainer's other per-step flags, see
``Trainer._apply_update``) makes the decision common, so all ranks skip the same update and their
weights stay identical. A skipped window still counts as an optimizer step slot: ``global_step``,
the LR schedule and the data position advance as in an uninterrupted run, only the weights and the
optimizer state stay as they were. ``--max_consecutive_nonfinite`` skips in a row end the run with
:class:`NonFiniteLossError` (the data or the learning rate is wrong; skipping further would only hide it).
"""

from __future__ import annotations

import torch


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Per-window non-finite bookkeeping: ``local_flag`` then, after the all-reduce, ``settle`` at each boundary."""

    def __init__(self, max_consecutive: int, device: torch.device) -> None:
        self.max_consecutive = max_consecutive
        self.device = device
        self.skipped = 0
        self.consecutive = 0
        self._window_bad = torch.zeros((), device=device)

    def observe(self, loss: torch.Tensor) -> None:
        """Record one micro-batch loss (no host sync: the flag stays a device tensor until ``decide``)."""
        self._window_bad = torch.maximum(self._window_bad, (~torch.isfinite(loss.detach()).all()).float())

    def local_flag(self, grad_norm: torch.Tensor | float | None) -> torch.Tensor:
        """This rank's verdict on the window that ends now (1.0 = non-finite), as a device tensor.

        ``grad_norm`` (the clipped norm, identical on every rank after DDP's all-reduce) also counts
        when given; under fp16 the trainer passes None because overflowing gradients are the grad
        scaler's business (it skips those steps itself and lowers the scale). Starts the next window;
        reads nothing back to the host.
        """
        flag = self._window_bad.clone()
        if grad_norm is not None:
            norm = torch.as_tensor(grad_norm, device=self.device, dtype=torch.float32)
            flag = torch.maximum(flag, (~torch.isfinite(norm)).float())
        self._window_bad = torch.zeros((), device=self.device)
        return flag

    def settle(self, flagged_ranks: float, step: int) -> bool:
        """True when the update of optimizer step ``step`` must be skipped on every rank.

        ``flagged_ranks`` is the sum of every rank's ``local_flag`` (one all-reduce, which the trainer
        shares with its other per-step flags so that a step reads the host once); every rank passes the
        same value, so all of them skip, count and stop together.
        """
        if flagged_ranks <= 0:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive optimizer steps (up to step {step}) had a non-finite loss or gradient "
                f"on at least one rank (--max_consecutive_nonfinite {self.max_consecutive}); stopping without a new "
                "checkpoint. Check the data of those steps and the learning rate; the last checkpoint is intact")
        return True
