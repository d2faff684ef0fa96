"""Network namespaces joined by a bridge: separate "hosts" on one machine for multi-node tests (iproute2).

``NetnsLab.create(names)`` makes one namespace per name, each with a veth pair whose inside end is called
``IFNAME`` and carries its own 10.213.N.i/24 address, the outside ends enslaved to a bridge that holds
10.213.N.254 (the host's address on that network), loopback up and a default route through the bridge
(Ray picks a node's address from its route to the internet, found by a UDP connect that sends nothing).
``probe()`` proves TCP works namespace -> namespace and host -> namespace. ``destroy()`` removes every
namespace, veth and the bridge it made and is safe to call after a partial ``create``. A lab holds a lock on
its subnet (a file in the temp dir) for its life, so labs built at once (parallel test runs) never share a
subnet or a name; everything it creates is named ``prlN...`` after its subnet 10.213.N.

Creating namespaces needs CAP_NET_ADMIN; ``NetnsUnavailable`` says which step the host refused and why, so
a test can skip with that reason.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

IFNAME = "prl0"  # the interface name inside every namespace
_PREFIX = "10.213"


class NetnsUnavailable(RuntimeError):
    """This host cannot build the namespaces (no permission, no bridge/veth support, or no TCP between)."""


def _ip(*args: str, step: str) -> None:
    try:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetnsUnavailable("iproute2's `ip` command is not installed") from None
    if out.returncode:
        raise NetnsUnavailable(f"{step}: `ip {' '.join(args)}` failed: {out.stderr.strip()}")


def _used_subnets() -> set[str]:
    out = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, timeout=30).stdout
    out += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=30).stdout
    return {".".join(word.split("/")[0].split(".")[:3]) for word in out.split() if word.startswith(_PREFIX)}


@dataclass
class NetnsLab:
    subnet: str = ""  # 10.213.N; N also names everything the lab makes (prlN-*, fits IFNAMSIZ)
    tag: str = ""
    bridge: str = ""
    namespaces: dict[str, str] = field(default_factory=dict)  # node name -> namespace name
    addresses: dict[str, str] = field(default_factory=dict)  # node name -> address inside its namespace
    host_veths: dict[str, str] = field(default_factory=dict)  # node name -> outside end of its veth
    _lock: IO[str] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, names: list[str]) -> NetnsLab:
        lab = cls()
        try:
            lab._build(names)
            lab.probe()
        except BaseException:
            lab.destroy()
            raise
        return lab

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.254"

    def exec_prefix(self, name: str) -> list[str]:
        """argv prefix that runs a command inside node ``name``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[name]]

    def host_veth_bytes(self, name: str) -> int:
        """Bytes the host has received from node ``name`` over its veth (what the namespace sent)."""
        return int(Path("/sys/class/net", self.host_veths[name], "statistics", "rx_bytes").read_text())

    def _claim(self, subnet: str) -> bool:
        """Hold a lock on ``subnet`` for this lab's life (two labs building at once never share one)."""
        handle = open(Path(tempfile.gettempdir(), f"prl-netns-{subnet}.lock"), "w")  # noqa: SIM115 - held
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock = handle
        return True

    def _build(self, names: list[str]) -> None:
        used = _used_subnets()
        for k in range(230):
            n = (os.getpid() + k) % 230 + 20
            if f"{_PREFIX}.{n}" not in used and self._claim(f"{_PREFIX}.{n}"):
                break
        else:
            raise NetnsUnavailable(f"no free {_PREFIX}.N.0/24 subnet on this host")
        self.subnet, self.tag = f"{_PREFIX}.{n}", str(n)
        # Holding the subnet's lock means no live lab uses these names: anything left is a killed run's.
        self._remove([f"prl{self.tag}-{name}" for name in names], [f"prl{self.tag}br"])
        # Namespaces first: the step that needs CAP_NET_ADMIN, so a refusing host is named by it.
        for name in names:
            ns = f"prl{self.tag}-{name}"
            _ip("netns", "add", ns, step="create a network namespace (needs CAP_NET_ADMIN)")
            self.namespaces[name] = ns
        self.bridge = f"prl{self.tag}br"
        _ip("link", "add", self.bridge, "type", "bridge", step="create a bridge")
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge, step="address the bridge")
        _ip("link", "set", self.bridge, "up", step="bring the bridge up")
        for i, name in enumerate(names, start=1):
            ns, veth = self.namespaces[name], f"prl{self.tag}v{i}"
            _ip(
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                IFNAME,
                "netns",
                ns,
                step="create a veth pair",
            )
            self.host_veths[name] = veth
            _ip("link", "set", veth, "master", self.bridge, step="attach the veth to the bridge")
            _ip("link", "set", veth, "up", step="bring the veth up")
            address = f"{self.subnet}.{i}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", IFNAME, step="address the namespace")
            _ip("-n", ns, "link", "set", IFNAME, "up", step="bring the namespace's veth up")
            _ip("-n", ns, "link", "set", "lo", "up", step="bring the namespace's loopback up")
            _ip("-n", ns, "route", "add", "default", "via", self.host_address, step="add a default route")
            self.addresses[name] = address

    def probe(self) -> None:
        """A listener in the first namespace must be reached from the second one and from the host."""
        names = list(self.namespaces)
        server_ip = self.addresses[names[0]]
        listener = (
            "import socket,sys\n"
            "s=socket.socket(); s.bind((sys.argv[1], 0)); s.listen(); s.settimeout(30)\n"
            "print(s.getsockname()[1], flush=True)\n"
            "for _ in range(2): s.accept()[0].close()\n"
        )
        server = subprocess.Popen(
            [*self.exec_prefix(names[0]), sys.executable, "-c", listener, server_ip],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = server.stdout.readline().strip()
            if not line.isdigit():
                raise NetnsUnavailable(
                    f"cannot run a process inside a namespace: {server.stderr.read().strip()}"
                )
            port = line
            client = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).close()"
            out = subprocess.run(
                [*self.exec_prefix(names[1]), sys.executable, "-c", client, server_ip, port],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if out.returncode:
                raise NetnsUnavailable(
                    "TCP between two namespaces over the bridge failed (a firewall on bridged traffic?): "
                    + (out.stderr.strip().splitlines() or ["no output"])[-1]
                )
            try:
                socket.create_connection((server_ip, int(port)), timeout=10).close()
            except OSError as exc:
                raise NetnsUnavailable(f"TCP from the host into a namespace failed: {exc}") from None
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

    @staticmethod
    def _remove(namespaces: list[str], links: list[str]) -> None:
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for link in links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)

    def destroy(self) -> None:
        """Remove what ``create`` made; errors are ignored so a partial setup is cleaned up too."""
        # A veth's host end vanishes with its namespace once the last process there is gone; delete it now.
        links = [*self.host_veths.values(), *([self.bridge] if self.bridge else [])]
        self._remove(list(self.namespaces.values()), links)
        self.namespaces, self.host_veths, self.bridge = {}, {}, ""
        if self._lock is not None:
            self._lock.close()  # releases the subnet
            self._lock = None
