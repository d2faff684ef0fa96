"""Error types shared by every layer; this module imports nothing, so any module may raise or catch them.

* ``UserError``: the user's input is wrong (a flag, a recipe value, a cluster that does not fit). The CLI prints
  its message as one line and exits 2; library code raises it (or a subclass) with the value and the fix.
* ``RunFailed``: a run that had started failed; the message is one line (what failed, where the log with the
  traceback is, what to run next). The CLI prints it and exits with ``exit_code`` (1; 130 when interrupted).
* ``CollectiveTimeout``: a collective or rendezvous failed or ran past its timeout; the message names the group,
  this rank and the ranks it waited for (``portable_rl.distributed.collective_errors`` builds it).
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


class RunFailed(Exception):
    """A started run failed; printed as one line, exit code ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class CollectiveTimeout(RuntimeError):
    """A weight-sync collective or rendezvous failed or ran past its timeout; the message names group and ranks."""
