"""Run a command that dies with the process that started it: ``python -m portable_rl.rollout.tied CMD...``.

Engines and the router run in their own session (so a stop reaches everything they fork), which also means
nothing reaps them if their owner is SIGKILLed (an OOM kill, a lost node, ``kill -9`` of the driver): they
would keep their ports and memory. On Linux this wrapper asks the kernel to SIGKILL it when its parent exits
(``PR_SET_PDEATHSIG``, which survives ``exec``), then replaces itself with the command. Elsewhere it only
execs. Used instead of ``preexec_fn``, which is unsafe in a process with threads (Ray workers have many).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def tie_to_parent(parent_pid: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m portable_rl.rollout.tied PARENT_PID COMMAND [ARGS...]")
    tie_to_parent(int(argv[0]))
    os.execvp(argv[1], argv[1:])


def tied_command(command: list[str]) -> list[str]:
    """``command`` wrapped so that it is killed when the calling process dies."""
    return [sys.executable, "-m", "portable_rl.rollout.tied", str(os.getpid()), *command]


if __name__ == "__main__":
    main(sys.argv[1:])
