"""Host-memory watchdog: run a command and stop it gracefully before the kernel OOM killer does.

Usage::

    python student_model_v2/oom_guard.py --min-available-gb 6 --interval 5 --kill-timeout 30 -- python train.py ...

Why: a trainer killed by the kernel OOM killer gets SIGKILL with no chance to checkpoint, and its data-loader workers
may linger. The guard starts the command in its own session/process group, polls system *available* memory
(``psutil.virtual_memory().available``, which counts reclaimable cache), and when it drops below the threshold sends
SIGTERM to the whole group — a trainer can save a checkpoint on SIGTERM — then SIGKILL to whatever is left after
``--kill-timeout`` seconds (checked at the next poll, so at most one ``--interval`` later).

Behaviour
---------
* ``--max-rss-gb`` (optional) also trips when the summed RSS of the command's process group exceeds the limit.
* SIGINT, SIGTERM and SIGHUP received by the guard are forwarded to the group (the child is in its own session, so
  a terminal's Ctrl-C would not reach it otherwise), with the same SIGKILL escalation after ``--kill-timeout``.
* When the command's main process exits, any processes it left in its group (e.g. data-loader workers) get
  SIGTERM, then SIGKILL after ``--kill-timeout``; the guard never returns while its group still runs.
* GB means GiB (2**30 bytes).

Exit codes
----------
* the command's exit code; 128 + N if it died from signal N (shell convention);
* ``99`` (``MEMORY_KILL_EXIT_CODE``) if the guard stopped it for memory, whatever the command's own code was. 99 is
  outside the shell's 126/127, the signal range 128-165 (e.g. 137 = SIGKILL, which the kernel OOM killer also
  produces) and argparse's 2, so a memory stop is distinguishable from a crash or an external kill;
* ``2`` for usage errors (no command given, bad values); 127 / 126 if the command is not found / not executable.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import psutil

MEMORY_KILL_EXIT_CODE = 99
GIB = 1024**3
_SHUTDOWN_POLL_S = 0.05
_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

log = logging.getLogger("oom_guard")


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds and timings; ``max_rss_gb`` None disables the RSS check."""

    min_available_gb: float
    interval_s: float
    kill_timeout_s: float
    max_rss_gb: float | None = None


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group is ``pgid``.

    Scans all pids rather than the child tree because orphaned grandchildren are re-parented away from the child but
    stay in its group; zombies are skipped because they hold no memory and cannot be signalled away.
    """
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError, psutil.AccessDenied):
            continue
    return members


def group_rss_bytes(pgid: int) -> int:
    """Summed resident set size of the group's live processes (shared pages are counted once per process)."""
    total = 0
    for proc in group_members(pgid):
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def memory_violation(config: GuardConfig, pgid: int) -> str | None:
    """A human-readable reason if a memory limit is crossed, else None."""
    available = psutil.virtual_memory().available
    if available < config.min_available_gb * GIB:
        return f"available memory {available / GIB:.2f} GiB < --min-available-gb {config.min_available_gb:g}"
    if config.max_rss_gb is not None:
        rss = group_rss_bytes(pgid)
        if rss > config.max_rss_gb * GIB:
            return f"process-group RSS {rss / GIB:.2f} GiB > --max-rss-gb {config.max_rss_gb:g}"
    return None


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the whole group; a group that is already gone is not an error."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return


def exit_code_of(returncode: int) -> int:
    """Popen's −N for "killed by signal N" becomes 128 + N, as a shell would report it."""
    return 128 - returncode if returncode < 0 else returncode


class Guard:
    """Runs one command under the memory watch; ``run`` returns the guard's exit code."""

    def __init__(self, command: Sequence[str], config: GuardConfig) -> None:
        self.command = list(command)
        self.config = config
        self.child: subprocess.Popen[bytes] | None = None
        self.kill_deadline: float | None = None
        self.killed_for_memory = False
        self.pending_signal: signal.Signals | None = None

    def _request_stop(self, sig: signal.Signals, reason: str) -> None:
        """Signal the group and arm the SIGKILL deadline (only the first request sets the deadline)."""
        assert self.child is not None
        log.warning("oom_guard: %s; sending %s to process group %d", reason, sig.name, self.child.pid)
        signal_group(self.child.pid, sig)
        if self.kill_deadline is None:
            self.kill_deadline = time.monotonic() + self.config.kill_timeout_s

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.child is None:
            self.pending_signal = sig
            return
        self._request_stop(sig, f"received {sig.name}")

    def _wait_for_leader(self) -> int:
        assert self.child is not None
        while True:
            timeout = self.config.interval_s
            if self.kill_deadline is not None:
                remaining = self.kill_deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("oom_guard: kill timeout reached; sending SIGKILL to process group %d", self.child.pid)
                    signal_group(self.child.pid, signal.SIGKILL)
                    return self.child.wait()
                timeout = min(timeout, remaining)
            try:
                return self.child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            if not self.killed_for_memory:
                reason = memory_violation(self.config, self.child.pid)
                if reason is not None:
                    self.killed_for_memory = True
                    self._request_stop(signal.SIGTERM, reason)

    def _reap_group(self) -> None:
        """Stop processes the leader left behind, so the guard never returns with its group still running."""
        assert self.child is not None
        pgid = self.child.pid
        if not group_members(pgid):
            return
        log.warning("oom_guard: command exited but its process group %d still runs; sending SIGTERM", pgid)
        signal_group(pgid, signal.SIGTERM)
        deadline = self.kill_deadline or time.monotonic() + self.config.kill_timeout_s
        while group_members(pgid):
            if time.monotonic() >= deadline:
                log.warning("oom_guard: kill timeout reached; sending SIGKILL to process group %d", pgid)
                signal_group(pgid, signal.SIGKILL)
                return
            time.sleep(_SHUTDOWN_POLL_S)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _FORWARDED_SIGNALS}
        try:
            self.child = subprocess.Popen(self.command, start_new_session=True)
            if self.pending_signal is not None:
                self._request_stop(self.pending_signal, f"received {self.pending_signal.name} during start-up")
            returncode = self._wait_for_leader()
            self._reap_group()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.killed_for_memory:
            log.warning(
                "oom_guard: command stopped for memory (its own exit status %d); exiting with %d",
                exit_code_of(returncode),
                MEMORY_KILL_EXIT_CODE,
            )
            return MEMORY_KILL_EXIT_CODE
        return exit_code_of(returncode)


def parse_args(argv: Sequence[str]) -> tuple[GuardConfig, list[str]]:
    parser = argparse.ArgumentParser(
        description="Run a command; SIGTERM then SIGKILL its process group when host memory runs low.",
        epilog=f"Exit code: the command's (128+N for signal N), or {MEMORY_KILL_EXIT_CODE} if stopped for memory.",
    )
    parser.add_argument("--min-available-gb", type=float, default=6.0, help="trip below this available memory (GiB)")
    parser.add_argument(
        "--interval", "--check-interval", dest="interval", type=float, default=5.0, help="seconds between checks"
    )
    parser.add_argument(
        "--kill-timeout", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL to the group"
    )
    parser.add_argument(
        "--max-rss-gb", type=float, default=None, help="also trip when the group's summed RSS exceeds this (GiB)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (usage: oom_guard.py [options] -- cmd args...)")
    if args.interval <= 0 or args.kill_timeout < 0 or args.min_available_gb < 0:
        parser.error("--interval must be > 0, --kill-timeout and --min-available-gb must be >= 0")
    if args.max_rss_gb is not None and args.max_rss_gb <= 0:
        parser.error("--max-rss-gb must be > 0")
    config = GuardConfig(args.min_available_gb, args.interval, args.kill_timeout, args.max_rss_gb)
    return config, command


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    config, command = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return Guard(command, config).run()
    except FileNotFoundError as exc:
        log.error("oom_guard: cannot start %r: %s", command[0], exc)
        return 127
    except PermissionError as exc:
        log.error("oom_guard: cannot execute %r: %s", command[0], exc)
        return 126


if __name__ == "__main__":
    sys.exit(main())
