"""Stopping a server subprocess (engine or router) that runs in its own session, with everything it forked."""

from __future__ import annotations

import os
import signal
import subprocess


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the server's own session: it and the processes it forked
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_group(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """SIGTERM the group, SIGKILL it after ``timeout_s``; reap leftovers of an already-exited server."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait(10)
    else:
        signal_group(proc, signal.SIGKILL)  # children the server left behind
    return proc.returncode
