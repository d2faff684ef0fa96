"""Small torch.distributed and networking helpers every layer may use (no portable_rl imports but errors).

Contract
--------
* ``free_port(host="")`` / ``free_ports(n, host="")``: unused TCP ports on ``host`` ("" or "0.0.0.0": every
  interface). ``free_ports`` holds all n sockets open while it picks, so the n ports differ. Ports come from
  below the kernel's ephemeral range (never handed to an outgoing connection in the meantime) and are then
  released for the caller to bind, so two processes picking at once could get the same one; each picked port
  is therefore also claimed, for the life of this process, with an
  exclusive lock on a file named after it in a per-user directory under the temp dir: a port another
  portable_rl process (a parallel test worker, another job's launcher) holds a claim on is never handed out.
* ``port_in_use(port, host="")``: whether binding TCP ``port`` fails now (a port the user asked for is checked
  before anything starts, instead of timing out in a rendezvous with EADDRINUSE).
* ``NODE_ADDRESS`` / ``resolve_master_address(value)`` / ``default_master_address()``: the address other
  processes reach a rendezvous on (None: this host; "node": its Ray node's address, for multi-node jobs).
* ``collective_errors(group=, backend=, rank=, world_size=, timeout_s=, what=)``: a collective that times out or
  loses a peer inside the block becomes ``CollectiveTimeout`` naming the group, the backend, this rank, the
  ranks it waited for, the timeout and what it was doing; other errors pass unchanged. Used for the trainer's
  world and Megatron's groups; the weight-update group (``portable_rl.protocol.process_group``) names its own.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from portable_rl.errors import CollectiveTimeout

__all__ = [
    "NODE_ADDRESS",
    "CollectiveTimeout",
    "collective_errors",
    "default_master_address",
    "describe_ranks",
    "first_line",
    "free_port",
    "free_ports",
    "is_collective_failure",
    "port_in_use",
    "resolve_master_address",
]


_CLAIMS: list[int] = []  # descriptors of this process's port claims: closing one (at exit) releases it


def _claim_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"portable_rl-ports-{os.getuid()}"


def _claim(port: int) -> bool:
    """Take the claim on ``port`` for this process; False when another live process holds it."""
    directory = _claim_dir()
    directory.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(directory / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _CLAIMS.append(fd)
    return True


# Ports are picked below the kernel's ephemeral range: a port taken from inside it (bind to port 0) can be
# handed to any outgoing connection of any process (HTTP clients, Ray's gRPC) between the pick and the bind
# that uses it, which made rendezvous fail with EADDRINUSE on busy hosts. 20000 stays above Ray's default
# worker-port range (10002-19999).
_PICK_LOW = 20000
_EPHEMERAL_DEFAULT = (32768, 60999)  # Linux's default ip_local_port_range


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT
    return low, high


def _candidate_ports() -> Iterator[int]:
    """Ports to try: random ones outside the ephemeral range, or the kernel's pick (0) where none is left."""
    low, high = _ephemeral_range()
    pools = [range(_PICK_LOW, low), range(max(high + 1, _PICK_LOW), 65536)]
    pool = max(pools, key=len)
    rng = random.SystemRandom()
    while True:
        yield rng.choice(pool) if len(pool) >= 1000 else 0


def free_ports(n: int, host: str = "") -> list[int]:
    """``n`` distinct unused TCP ports on ``host``, each claimed for this process (module docstring)."""
    bind_host = "" if host in ("", "0.0.0.0") else host
    socks, ports = [], []
    candidates = _candidate_ports()
    try:
        for _ in range(64 * n):  # taken or claimed by others: try another
            if len(ports) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)  # stays bound until all are picked, so this call never gets one port twice
            try:
                s.bind((bind_host, next(candidates)))
            except OSError:
                continue  # in use on this host
            port = s.getsockname()[1]
            if _claim(port):
                ports.append(port)
        if len(ports) < n:
            raise OSError(f"found {len(ports)} of {n} free ports on {host or 'all interfaces'}")
        return ports
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "") -> int:
    """One unused TCP port on ``host`` ("" or "0.0.0.0": every interface)."""
    return free_ports(1, host)[0]


def port_in_use(port: int, host: str = "") -> bool:
    """True when TCP ``port`` cannot be bound on ``host`` now (another process listens or holds it)."""
    bind_host = "" if host in ("", "0.0.0.0") else host
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((bind_host, port))
        except OSError:
            return True
    return False


NODE_ADDRESS = "node"  # master_address value: the Ray node address of the process hosting the rendezvous


def resolve_master_address(value: str | None) -> str:
    """The rendezvous address for a configured ``master_address`` (None: this host; "node": its Ray node)."""
    if value == NODE_ADDRESS:
        import ray

        # The address the node was started with (`ray start --node-ip-address`), which other nodes reach;
        # the host name may resolve to loopback (127.0.1.1 on Debian-style hosts).
        return ray.util.get_node_ip_address()
    return value or default_master_address()


def default_master_address() -> str:
    """This host's address as other hosts see it (loopback when the host has no routable name)."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return address or "127.0.0.1"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def describe_ranks(ranks: list[int]) -> str:
    if not ranks:
        return "none"
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}..{ranks[-1]}"
    return ", ".join(str(r) for r in ranks)


# Lower-case fragments of the errors a collective raises when a peer is missing (gloo: "Timed out waiting
# 2000ms for recv operation"; a peer that died: "Connection closed by peer" / "Connection reset by peer").
_PEER_FAILURE_HINTS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def is_collective_failure(exc: BaseException) -> bool:
    """True for errors a collective raises when it times out or loses a peer."""
    import torch.distributed as dist  # here, not at import: launchers and the CLI import this module

    if isinstance(exc, CollectiveTimeout):
        return False  # already named
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(h in text for h in _PEER_FAILURE_HINTS)


@contextmanager
def collective_errors(
    *, group: str, backend: str, rank: int, world_size: int, timeout_s: float, what: str
) -> Iterator[None]:
    """Re-raise a timed-out or peer-less collective in the block as CollectiveTimeout naming group and ranks."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError is a RuntimeError
        if not is_collective_failure(exc):
            raise
        others = [r for r in range(world_size) if r != rank]
        verb = "timed out" if any(h in str(exc).lower() for h in ("timed out", "timeout")) else "lost a peer"
        raise CollectiveTimeout(
            f"{group} ({backend}, {world_size} ranks): rank {rank} {verb} in {what} waiting for rank(s) "
            f"{describe_ranks(others)} (collective timeout {timeout_s:g}s): {first_line(exc)}. "
            "A rank that stopped, died or runs a different step never joined the collective; its log says why."
        ) from exc
