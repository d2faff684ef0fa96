"""Error types shared by every layer; this module imports nothing, so any module may raise or catch them.

* ``UserError``: the user's input is wrong (a flag, a recipe value, a cluster that does not fit). The CLI prints
  its message as one line and exits 2; library code raises it (or a subclass) with the value and the fix.
* ``CollectiveTimeout``: a collective or rendezvous failed or ran past its timeout; the message names the group,
  this rank and the ranks it waited for (``portable_rl.distributed.collective_errors`` builds it).
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


class CollectiveTimeout(RuntimeError):
    """A weight-sync collective or rendezvous failed or ran past its timeout; the message names group and ranks."""
