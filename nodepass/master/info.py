"""Host figures for the master API's ``GET /info``.

:class:`SystemInfo` gathers, through psutil, the system part of the info
object: ``os``, ``arch``, ``cpu``, ``mem_total``, ``mem_used``,
``swap_total``, ``swap_used``, ``netrx``, ``nettx``, ``diskr``, ``diskw``
and ``sysup``.  The numbers mean what the Go master reports:

* ``cpu`` -- whole-system busy percentage (0-100, rounded down) over the
  window since the previous CPU sample: busy = every CPU time counter except
  ``idle`` (iowait counts as busy).  No call ever sleeps: the previous sample
  is kept, and a window shorter than :data:`MIN_CPU_WINDOW` reuses the last
  figure.  ``-1`` while no figure is known yet.
* ``mem_used`` -- total memory minus *available* memory (not psutil's
  ``used``); ``swap_used`` -- swap total minus swap free.
* ``netrx``/``nettx`` -- bytes received/sent since boot, summed over the
  network interfaces except loopback and container/bridge plumbing (names
  starting with ``lo``, ``veth``, ``docker``, ``podman``, ``br-``,
  ``virbr``).
* ``diskr``/``diskw`` -- bytes read/written since boot, summed over whole
  disks only (partitions, loop, RAM, device-mapper and software-RAID devices
  are left out so nothing is counted twice).  Unlike the Go master, NVMe and
  MMC disks (``nvme0n1``, ``mmcblk0``) are counted.
* ``sysup`` -- whole seconds since the host booted.

A figure that cannot be read on this host is 0 (``cpu`` -1); reading never
raises.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import psutil

__all__ = ["MIN_CPU_WINDOW", "SystemInfo", "go_arch", "go_os"]

#: Shortest window (seconds) over which a new CPU percentage is computed.
MIN_CPU_WINDOW = 0.1

#: Where Linux lists whole block devices (partitions live one level deeper).
SYS_BLOCK = "/sys/block"

_SKIPPED_NIC_PREFIXES = ("lo", "veth", "docker", "podman", "br-", "virbr")
_WHOLE_DISK_WITH_DIGIT = re.compile(r"^(nvme\d+n\d+|mmcblk\d+)$")

_ARCH_NAMES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "x64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv8l": "arm",
    "i386": "386",
    "i486": "386",
    "i586": "386",
    "i686": "386",
    "x86": "386",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips": "mips",
    "mipsel": "mipsle",
    "mips64": "mips64",
    "mips64el": "mips64le",
    "loongarch64": "loong64",
}


def go_os(platform_name: str | None = None) -> str:
    """Name the operating system as Go does (``linux``, ``darwin``, ``windows``...)."""
    name = sys.platform if platform_name is None else platform_name
    if name.startswith("linux"):
        return "linux"
    if name in ("win32", "cygwin", "msys"):
        return "windows"
    if name == "darwin":
        return "darwin"
    return re.sub(r"\d+$", "", name) or name


def go_arch(machine: str | None = None) -> str:
    """Name the CPU architecture as Go does (``amd64``, ``arm64``, ``386``...)."""
    raw = platform.machine() if machine is None else machine
    lowered = raw.lower()
    if lowered in _ARCH_NAMES:
        return _ARCH_NAMES[lowered]
    if lowered.startswith("arm"):
        return "arm"
    return lowered or "unknown"


class CpuSample(NamedTuple):
    """Cumulative CPU times: ``total`` of every counter and its ``idle`` part."""

    total: float
    idle: float


def psutil_cpu_sample() -> CpuSample:
    """Read the aggregate CPU times through psutil."""
    times = psutil.cpu_times()
    return CpuSample(total=float(sum(times)), idle=float(times.idle))


def cpu_percent(before: CpuSample, after: CpuSample) -> int:
    """Busy percentage between two samples, rounded down; -1 if no time passed."""
    delta_total = after.total - before.total
    if delta_total <= 0:
        return -1
    delta_idle = after.idle - before.idle
    busy = (delta_total - delta_idle) * 100 / delta_total
    return max(0, min(100, int(busy)))


def _is_whole_disk(name: str, linux: bool) -> bool:
    """True for a disk whose figures should be summed (no partitions, no virtual devices)."""
    if "loop" in name or "ram" in name or name.startswith(("dm-", "md", "sr")):
        return False
    if not linux:
        return True
    if os.path.isdir(SYS_BLOCK):
        return os.path.exists(os.path.join(SYS_BLOCK, name.replace("/", "!")))
    if _WHOLE_DISK_WITH_DIGIT.match(name):
        return True
    return not name[-1:].isdigit()


class SystemInfo:
    """Reads the host part of the ``/info`` object.

    ``clock`` gives the wall-clock time in seconds; it times the CPU window
    and, with the boot time, yields ``sysup``.  ``cpu_sampler`` reads the
    cumulative CPU times (tests inject a fake).  The first CPU sample is taken
    at construction.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        cpu_sampler: Callable[[], CpuSample] = psutil_cpu_sample,
    ) -> None:
        self._clock = clock
        self._cpu_sampler = cpu_sampler
        self._linux = go_os() == "linux"
        self._cpu = -1
        self._previous: tuple[float, CpuSample] | None = None
        self.sample_cpu()

    def sample_cpu(self) -> int:
        """Take a CPU sample now and return the current CPU figure.

        A new percentage is computed when at least :data:`MIN_CPU_WINDOW`
        seconds passed since the sample it is measured from; otherwise the
        previous figure stays.  Calling this periodically (e.g. every few
        seconds) keeps the figure recent; :meth:`snapshot` calls it too.
        """
        now = self._clock()
        try:
            current = self._cpu_sampler()
        except Exception:
            return self._cpu
        if self._previous is None:
            self._previous = (now, current)
            return self._cpu
        then, before = self._previous
        if now - then >= MIN_CPU_WINDOW or now < then:
            percent = cpu_percent(before, current)
            if percent >= 0:
                self._cpu = percent
            self._previous = (now, current)
        return self._cpu

    def snapshot(self) -> dict[str, object]:
        """Return the host figures as a dict (keys listed in the module doc)."""
        mem_total, mem_used, swap_total, swap_used = self._memory()
        netrx, nettx = self._network()
        diskr, diskw = self._disks()
        return {
            "os": go_os(),
            "arch": go_arch(),
            "cpu": self.sample_cpu(),
            "mem_total": mem_total,
            "mem_used": mem_used,
            "swap_total": swap_total,
            "swap_used": swap_used,
            "netrx": netrx,
            "nettx": nettx,
            "diskr": diskr,
            "diskw": diskw,
            "sysup": self._uptime(),
        }

    def _memory(self) -> tuple[int, int, int, int]:
        mem_total = mem_used = swap_total = swap_used = 0
        try:
            memory = psutil.virtual_memory()
            mem_total = int(memory.total)
            mem_used = max(0, mem_total - int(memory.available))
        except Exception:
            pass
        try:
            swap = psutil.swap_memory()
            swap_total = int(swap.total)
            swap_used = max(0, swap_total - int(swap.free))
        except Exception:
            pass
        return mem_total, mem_used, swap_total, swap_used

    def _network(self) -> tuple[int, int]:
        try:
            counters = psutil.net_io_counters(pernic=True, nowrap=True)
        except Exception:
            return 0, 0
        received = sent = 0
        for name, nic in counters.items():
            if name.startswith(_SKIPPED_NIC_PREFIXES):
                continue
            received += int(nic.bytes_recv)
            sent += int(nic.bytes_sent)
        return received, sent

    def _disks(self) -> tuple[int, int]:
        try:
            counters = psutil.disk_io_counters(perdisk=True, nowrap=True)
        except Exception:
            return 0, 0
        if not counters:
            return 0, 0
        read = written = 0
        for name, disk in counters.items():
            if not _is_whole_disk(name, self._linux):
                continue
            read += int(disk.read_bytes)
            written += int(disk.write_bytes)
        return read, written

    def _uptime(self) -> int:
        try:
            return max(0, int(self._clock() - psutil.boot_time()))
        except Exception:
            return 0
