"""Free ports without races between processes: a port another process claimed is never handed out."""

from __future__ import annotations

import subprocess
import sys

from portable_rl import distributed
from portable_rl.distributed import free_port, free_ports

HOLDER = """
import sys
from portable_rl.distributed import free_port
print(free_port("127.0.0.1"), flush=True)
sys.stdin.readline()
"""


def test_a_port_claimed_by_a_live_process_is_not_handed_out(monkeypatch):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(holder.stdout.readline())
        assert not distributed._claim(port)  # held by the other process
        # Even when the kernel offers that very port first, this process gets another one.
        offered = iter([port])
        real_bind = distributed.socket.socket.bind

        class Socket(distributed.socket.socket):
            def bind(self, address):
                wanted = next(offered, 0)
                return real_bind(self, (address[0], wanted))

        monkeypatch.setattr(distributed.socket, "socket", Socket)
        got = free_port("127.0.0.1")
        assert got != port
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)
    assert distributed._claim(port)  # released with the process that held it


def test_free_ports_are_distinct_and_claimed():
    ports = free_ports(5, "127.0.0.1")
    assert len(set(ports)) == 5
    assert not any(distributed._claim(p) for p in ports)  # claimed: not handed out again, here or elsewhere


def test_ports_come_from_below_the_ephemeral_range():
    """A port inside the kernel's ephemeral range can go to any outgoing connection before the caller binds it."""
    low, high = distributed._ephemeral_range()
    ports = free_ports(20, "127.0.0.1")
    if low - distributed._PICK_LOW >= 1000:
        assert all(distributed._PICK_LOW <= p < low for p in ports), (ports, low)
    else:  # this host's ephemeral range leaves no room below it: the ports come from above it
        assert all(p > high for p in ports), (ports, high)
