"""Network namespaces for the fault tests: a test host of our own joined to this one by a veth pair.

:class:`Link` makes a namespace ``np<pid>x<n>`` and a veth pair between it and
the namespace the tests run in, with a /30 of 10.213.0.0/16 chosen from the
process id (skipping blocks already on an interface), so concurrent test runs
on one machine never share a name or an address.  The link can go down and up
(a partition) and take a ``tc tbf`` bandwidth limit.  Everything is removed at
the test's cleanup: processes started in the namespace, the veth pair, the
namespace.

:func:`unavailable` says why a machine cannot do this (not root, no ``ip``
or ``tc``, namespaces refused); tests skip with that reason.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess

from twisted.trial.unittest import SkipTest, TestCase

_counter = itertools.count()
_probe: str | None | bool = False
SUBNET = ipaddress.ip_network("10.213.0.0/16")


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (None when they can); probed once."""
    global _probe
    if _probe is not False:
        return _probe  # type: ignore[return-value]
    reason: str | None = None
    if os.geteuid() != 0:
        reason = "network namespaces need root"
    elif shutil.which("ip") is None:
        reason = "the ip command (iproute2) is not installed"
    elif shutil.which("tc") is None:
        reason = "the tc command (iproute2) is not installed"
    else:
        name = f"np{os.getpid()}probe"
        result = _run("ip", "netns", "add", name, check=False)
        if result.returncode != 0:
            reason = f"cannot create a network namespace: {result.stderr.strip()}"
        else:
            _run("ip", "netns", "del", name, check=False)
    _probe = reason
    return reason


def remove_stale() -> None:
    """Delete namespaces (and their ``/etc/netns`` files) that test runs whose process is gone
    left behind, e.g. after a kill -9 of the test runner; a namespace's veth pair goes with it."""
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        match = re.match(r"np(\d+)x\d+\b", line.strip())
        if match is None or os.path.exists(f"/proc/{match.group(1)}"):
            continue
        name = line.split()[0]
        _run("ip", "netns", "del", name, check=False)
        shutil.rmtree(os.path.join("/etc/netns", name), ignore_errors=True)


def _used_blocks() -> set[ipaddress.IPv4Network]:
    out = _run("ip", "-4", "-o", "addr", "show", check=False).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            net = ipaddress.ip_interface(parts[parts.index("inet") + 1]).network
            used.add(ipaddress.ip_network(f"{net.network_address}/30", strict=False))
    return used


class Link:
    """A namespace joined to ours by a veth pair; see the module docstring.

    ``near`` is our address on the link, ``far`` the namespace's; ``name`` the
    namespace.  ``prefix`` runs a command inside it (``ip netns exec NAME``).
    """

    def __init__(self, test: TestCase) -> None:
        reason = unavailable()
        if reason is not None:
            raise SkipTest(reason)
        n = next(_counter)
        if n == 0:
            remove_stale()
        tag = f"{os.getpid()}x{n}"
        self.name = f"np{tag}"
        self.near_dev = f"npa{tag}"[:15]
        self.far_dev = f"npb{tag}"[:15]
        blocks = list(SUBNET.subnets(new_prefix=30))
        used = _used_blocks()
        start = (os.getpid() * 7 + n) % len(blocks)
        block = next(b for b in blocks[start:] + blocks[:start] if b not in used)
        hosts = list(block.hosts())
        self.near, self.far = str(hosts[0]), str(hosts[1])
        self.etc_dirs: list[str] = []
        test.addCleanup(self.remove)
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.near_dev, "type", "veth", "peer", "name", self.far_dev, "netns", self.name)
        _run("ip", "addr", "add", f"{self.near}/30", "dev", self.near_dev)
        _run("ip", "link", "set", self.near_dev, "up")
        _run("ip", "-n", self.name, "addr", "add", f"{self.far}/30", "dev", self.far_dev)
        _run("ip", "-n", self.name, "link", "set", self.far_dev, "up")
        _run("ip", "-n", self.name, "link", "set", "lo", "up")

    @property
    def prefix(self) -> list[str]:
        return [shutil.which("ip") or "ip", "netns", "exec", self.name]

    def etc_file(self, name: str, text: str) -> str:
        """Write ``/etc/netns/<namespace>/<name>``: processes started with :attr:`prefix` see it as
        ``/etc/<name>`` (``ip netns exec`` bind-mounts it).  Rewriting it later in place (this
        method again) changes what they see; the directory goes at cleanup.  Returns the path."""
        directory = os.path.join("/etc/netns", self.name)
        if not os.path.isdir(directory):
            os.makedirs(directory)
            self.etc_dirs.append(directory)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as handle:  # in place: the bind mount follows the inode
            handle.write(text)
        return path

    def down(self) -> None:
        """Partition: the link goes down (both ends lose carrier; nothing crosses)."""
        _run("ip", "link", "set", self.near_dev, "down")

    def up(self) -> None:
        """Heal the partition (the address route comes back with the link)."""
        _run("ip", "link", "set", self.near_dev, "up")

    def limit(self, rate: str = "100mbit", burst: str = "256kb", latency: str = "50ms") -> None:
        """A token-bucket bandwidth limit on both directions of the link."""
        _run("tc", "qdisc", "replace", "dev", self.near_dev, "root", "tbf", "rate", rate, "burst", burst,
             "latency", latency)
        _run("ip", "netns", "exec", self.name, "tc", "qdisc", "replace", "dev", self.far_dev, "root", "tbf",
             "rate", rate, "burst", burst, "latency", latency)

    def namespace_pids(self) -> list[int]:
        out = _run("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def remove(self) -> None:
        """Kill what runs in the namespace, delete the veth pair and the namespace."""
        for pid in self.namespace_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _run("ip", "link", "del", self.near_dev, check=False)
        _run("ip", "netns", "del", self.name, check=False)
        for directory in self.etc_dirs:
            shutil.rmtree(directory, ignore_errors=True)


def netns_exists(name: str) -> bool:
    return name in _run("ip", "netns", "list", check=False).stdout.split()


def process_fds(pid: int) -> int:
    """Open descriptors of process *pid*."""
    return len(os.listdir(f"/proc/{pid}/fd"))

