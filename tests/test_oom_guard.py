"""oom_guard runs real child processes: memory kill, SIGKILL escalation, exit-code pass-through, signal forwarding."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from student_model_v2.oom_guard import MEMORY_KILL_EXIT_CODE

GUARD = Path(__file__).resolve().parents[1] / "student_model_v2" / "oom_guard.py"
MIB = 1024**2
GIB = 1024**3


def _guard_cmd(*guard_args: str, child_code: str) -> list[str]:
    return [sys.executable, str(GUARD), *guard_args, "--", sys.executable, "-c", textwrap.dedent(child_code)]


def _is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


ALLOCATE_600_MIB = """
    import signal, sys, time
    import numpy as np
    {handler}
    block = np.ones(600 * 1024 * 1024 // 8)  # np.ones writes every page, so they are resident
    print("allocated", flush=True)
    time.sleep(60)
"""


def test_memory_threshold_stops_child_with_sigterm_first() -> None:
    available = psutil.virtual_memory().available
    if available < 2 * GIB:
        pytest.skip(f"needs 2 GiB available memory, have {available / GIB:.2f}")
    threshold_gb = (available - 300 * MIB) / GIB
    handler = "signal.signal(signal.SIGTERM, lambda *_: (print('checkpoint', flush=True), sys.exit(0)))"
    cmd = _guard_cmd(
        "--min-available-gb", f"{threshold_gb:.4f}", "--interval", "0.1", "--kill-timeout", "5",
        child_code=ALLOCATE_600_MIB.format(handler=handler),
    )
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == MEMORY_KILL_EXIT_CODE, result.stderr
    assert "checkpoint" in result.stdout, "the child never saw SIGTERM before being stopped"
    assert "available memory" in result.stderr
    assert elapsed < 15, f"guard took {elapsed:.1f}s to stop a child that sleeps 60s"


def test_rss_limit_escalates_to_sigkill_when_sigterm_is_ignored() -> None:
    handler = "signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    cmd = _guard_cmd(
        "--min-available-gb", "0", "--max-rss-gb", "0.25", "--interval", "0.1", "--kill-timeout", "0.5",
        child_code=ALLOCATE_600_MIB.format(handler=handler),
    )
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == MEMORY_KILL_EXIT_CODE, result.stderr
    assert "RSS" in result.stderr and "SIGKILL" in result.stderr
    assert time.monotonic() - start < 15


@pytest.mark.parametrize(
    ("child_code", "expected"),
    [("import sys; sys.exit(7)", 7), ("pass", 0), ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137)],
)
def test_exit_code_passes_through(child_code: str, expected: int) -> None:
    cmd = _guard_cmd("--min-available-gb", "0", "--interval", "0.1", child_code=child_code)
    assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == expected


def test_sigterm_to_guard_reaches_child(tmp_path: Path) -> None:
    marker = tmp_path / "got_sigterm"
    child = f"""
        import signal, sys, time
        def on_term(*_):
            open({str(marker)!r}, "w").write("yes")
            sys.exit(5)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep(60)
    """
    cmd = _guard_cmd("--min-available-gb", "0", "--interval", "0.1", "--kill-timeout", "5", child_code=child)
    guard = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert guard.stdout is not None and guard.stdout.readline().strip() == "ready"
        guard.send_signal(signal.SIGTERM)
        assert guard.wait(timeout=15) == 5
    finally:
        if guard.poll() is None:
            guard.kill()
            guard.wait()
    assert marker.read_text() == "yes"


def test_processes_left_in_the_group_are_stopped() -> None:
    child = f"""
        import subprocess, sys
        grandchild = subprocess.Popen([{sys.executable!r}, "-c", "import time; time.sleep(60)"])
        print(grandchild.pid, flush=True)
    """
    cmd = _guard_cmd("--min-available-gb", "0", "--interval", "0.1", "--kill-timeout", "5", child_code=child)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    grandchild_pid = int(result.stdout.strip())
    try:
        assert result.returncode == 0, result.stderr
        assert "still runs" in result.stderr
        assert _is_gone(grandchild_pid)
    finally:
        if not _is_gone(grandchild_pid):
            os.kill(grandchild_pid, signal.SIGKILL)


def test_missing_command_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, str(GUARD), "--min-available-gb", "1", "--"], capture_output=True)
    assert result.returncode == 2 and b"no command" in result.stderr
