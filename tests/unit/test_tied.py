"""A server started through ``tied_command`` dies with its owner, even when the owner is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from portable_rl.rollout.tied import tied_command

OWNER = """
import subprocess, sys, time
from portable_rl.rollout.tied import tied_command
proc = subprocess.Popen(tied_command([sys.executable, "-c", "import time; time.sleep(120)"]),
                        start_new_session=True)
print(proc.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_its_killed_owner():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    server = psutil.Process(int(owner.stdout.readline()))
    try:
        deadline = time.monotonic() + 30
        while "time.sleep(120)" not in " ".join(server.cmdline()):  # exec'd into the command, same pid
            assert time.monotonic() < deadline, server.cmdline()
            time.sleep(0.05)
        assert server.is_running()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        server.wait(timeout=10)  # raises psutil.TimeoutExpired if it outlived its owner
    finally:
        if server.is_running():
            server.kill()


def test_usage_error_is_one_line():
    out = subprocess.run([sys.executable, "-m", "portable_rl.rollout.tied"], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().startswith("usage:") and "\n" not in out.stderr.strip()


def test_command_shape():
    cmd = tied_command(["echo", "hi"])
    assert cmd[1:4] == ["-m", "portable_rl.rollout.tied", str(os.getpid())] and cmd[-2:] == ["echo", "hi"]
