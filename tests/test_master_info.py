"""Host figures of the master API's /info."""

from __future__ import annotations

import os
from collections import namedtuple
from typing import Any

import psutil
from twisted.trial import unittest

from nodepass.master import info as info_module
from nodepass.master.info import CpuSample, SystemInfo, cpu_percent, go_arch, go_os

KEYS = {
    "os", "arch", "cpu", "mem_total", "mem_used", "swap_total", "swap_used",
    "netrx", "nettx", "diskr", "diskw", "sysup",
}

Memory = namedtuple("Memory", "total available used free")
Swap = namedtuple("Swap", "total used free")
Nic = namedtuple("Nic", "bytes_sent bytes_recv")
Disk = namedtuple("Disk", "read_bytes write_bytes")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeCpu:
    """Returns the queued samples in order, repeating the last one."""

    def __init__(self, *samples: tuple[float, float]) -> None:
        self.samples = [CpuSample(total, idle) for total, idle in samples]

    def __call__(self) -> CpuSample:
        if len(self.samples) > 1:
            return self.samples.pop(0)
        return self.samples[0]


class RealHostTests(unittest.TestCase):
    def test_snapshot_shape(self) -> None:
        snapshot = SystemInfo().snapshot()
        self.assertEqual(set(snapshot), KEYS)
        self.assertEqual(snapshot["os"], go_os())
        self.assertEqual(snapshot["arch"], go_arch())
        for key in KEYS - {"os", "arch"}:
            with self.subTest(key=key):
                value = snapshot[key]
                self.assertIsInstance(value, int)
                self.assertNotIsInstance(value, bool)
                self.assertGreaterEqual(value, -1 if key == "cpu" else 0)
        cpu = snapshot["cpu"]
        assert isinstance(cpu, int)
        self.assertLessEqual(cpu, 100)
        mem_total, mem_used = snapshot["mem_total"], snapshot["mem_used"]
        assert isinstance(mem_total, int) and isinstance(mem_used, int)
        self.assertGreater(mem_total, 0)
        self.assertLessEqual(mem_used, mem_total)
        self.assertGreater(snapshot["sysup"], 0)

    def test_cpu_from_real_samples(self) -> None:
        clock = FakeClock()
        system = SystemInfo(clock=clock)
        # Busy-loop until the kernel's CPU counters move, then take a sample.
        start = psutil.cpu_times()
        while sum(psutil.cpu_times()) == sum(start):
            pass
        clock.now += 1.0
        cpu = system.sample_cpu()
        self.assertGreaterEqual(cpu, 0)
        self.assertLessEqual(cpu, 100)


class CpuTests(unittest.TestCase):
    def test_percent(self) -> None:
        # iowait is busy time: only the idle counter counts as idle.
        self.assertEqual(cpu_percent(CpuSample(1000, 800), CpuSample(1100, 850)), 50)
        self.assertEqual(cpu_percent(CpuSample(0, 0), CpuSample(300, 0.5)), 99)
        self.assertEqual(cpu_percent(CpuSample(0, 0), CpuSample(300, 300)), 0)
        self.assertEqual(cpu_percent(CpuSample(5, 5), CpuSample(5, 5)), -1)

    def test_unknown_until_a_window_passed(self) -> None:
        clock = FakeClock()
        cpu = FakeCpu((1000, 800), (1100, 850), (1300, 1050), (1400, 1060))
        system = SystemInfo(clock=clock, cpu_sampler=cpu)
        self.assertEqual(system.snapshot()["cpu"], -1)  # window too short: no figure yet
        clock.now += 0.5
        # measured from the first sample: busy (300 - 250) of 300
        self.assertEqual(system.snapshot()["cpu"], 16)
        clock.now += 0.05
        self.assertEqual(system.snapshot()["cpu"], 16)  # too short: previous figure kept

    def test_window_is_measured_from_previous_sample(self) -> None:
        clock = FakeClock()
        cpu = FakeCpu((1000, 800), (1100, 850), (1200, 860))
        system = SystemInfo(clock=clock, cpu_sampler=cpu)
        clock.now += 1
        self.assertEqual(system.sample_cpu(), 50)  # 1000/800 -> 1100/850
        clock.now += 1
        self.assertEqual(system.sample_cpu(), 90)  # 1100/850 -> 1200/860

    def test_no_progress_keeps_previous_figure(self) -> None:
        clock = FakeClock()
        system = SystemInfo(clock=clock, cpu_sampler=FakeCpu((0, 0), (100, 75), (100, 75)))
        clock.now += 1
        self.assertEqual(system.sample_cpu(), 25)
        clock.now += 1
        self.assertEqual(system.sample_cpu(), 25)

    def test_sampler_failure(self) -> None:
        def broken() -> CpuSample:
            raise OSError("no /proc")

        self.assertEqual(SystemInfo(cpu_sampler=broken).snapshot()["cpu"], -1)


class FiguresTests(unittest.TestCase):
    """psutil is replaced so the sums can be checked exactly."""

    def setUp(self) -> None:
        self.patch(psutil, "virtual_memory", lambda: Memory(8000, 3000, 1234, 999))
        self.patch(psutil, "swap_memory", lambda: Swap(2000, 555, 1500))
        nics = {
            "eth0": Nic(bytes_sent=10, bytes_recv=100),
            "wlan0": Nic(bytes_sent=20, bytes_recv=200),
            "lo": Nic(bytes_sent=1, bytes_recv=1),
            "veth12ab": Nic(bytes_sent=1, bytes_recv=1),
            "docker0": Nic(bytes_sent=1, bytes_recv=1),
            "podman1": Nic(bytes_sent=1, bytes_recv=1),
            "br-3f2a": Nic(bytes_sent=1, bytes_recv=1),
            "virbr0": Nic(bytes_sent=1, bytes_recv=1),
        }
        self.patch(psutil, "net_io_counters", lambda pernic, nowrap: nics)
        self.disks = {
            "sda": Disk(1000, 2000),
            "sda1": Disk(400, 800),
            "nvme0n1": Disk(30000, 40000),
            "nvme0n1p1": Disk(3, 4),
            "vdb": Disk(5, 6),
            "loop0": Disk(7, 7),
            "zram0": Disk(7, 7),
            "ram0": Disk(7, 7),
            "dm-0": Disk(7, 7),
            "md127": Disk(7, 7),
            "sr0": Disk(7, 7),
        }
        self.patch(psutil, "disk_io_counters", lambda perdisk, nowrap: self.disks)
        self.patch(psutil, "boot_time", lambda: 1000.0)
        self.sys_block = self.mktemp()
        os.mkdir(self.sys_block)
        for name in self.disks:
            if name[-2:] not in ("a1", "p1"):
                os.mkdir(os.path.join(self.sys_block, name))
        self.patch(info_module, "SYS_BLOCK", self.sys_block)

    def snapshot(self) -> dict[str, Any]:
        return SystemInfo(clock=FakeClock(4600.9)).snapshot()

    def test_memory(self) -> None:
        snapshot = self.snapshot()
        self.assertEqual(snapshot["mem_total"], 8000)
        self.assertEqual(snapshot["mem_used"], 5000)  # total - available
        self.assertEqual(snapshot["swap_total"], 2000)
        self.assertEqual(snapshot["swap_used"], 500)  # total - free

    def test_network_skips_loopback_and_bridges(self) -> None:
        snapshot = self.snapshot()
        self.assertEqual(snapshot["netrx"], 300)
        self.assertEqual(snapshot["nettx"], 30)

    def test_disks_whole_devices_only(self) -> None:
        snapshot = self.snapshot()
        if go_os() == "linux":
            self.assertEqual(snapshot["diskr"], 1000 + 30000 + 5)
            self.assertEqual(snapshot["diskw"], 2000 + 40000 + 6)

    def test_disks_by_name_without_sysfs(self) -> None:
        self.patch(info_module, "SYS_BLOCK", os.path.join(self.sys_block, "absent"))
        snapshot = self.snapshot()
        if go_os() == "linux":
            self.assertEqual(snapshot["diskr"], 1000 + 30000 + 5)
            self.assertEqual(snapshot["diskw"], 2000 + 40000 + 6)

    def test_whole_disk_rule_elsewhere(self) -> None:
        # Other systems list whole disks only; virtual devices are still left out.
        whole = info_module._is_whole_disk
        self.assertTrue(whole("disk0", False))
        self.assertTrue(whole("PhysicalDrive0", False))
        self.assertFalse(whole("md0", False))

    def test_uptime(self) -> None:
        self.assertEqual(self.snapshot()["sysup"], 3600)

    def test_failures_give_zero(self) -> None:
        def broken(*args: object, **kwargs: object) -> object:
            raise OSError("not available")

        for name in ["virtual_memory", "swap_memory", "net_io_counters", "disk_io_counters", "boot_time"]:
            self.patch(psutil, name, broken)
        snapshot = self.snapshot()
        for key in KEYS - {"os", "arch", "cpu"}:
            with self.subTest(key=key):
                self.assertEqual(snapshot[key], 0)

    def test_no_disks(self) -> None:
        self.patch(psutil, "disk_io_counters", lambda perdisk, nowrap: {})
        self.assertEqual(self.snapshot()["diskr"], 0)


class NamesTests(unittest.TestCase):
    def test_os(self) -> None:
        cases = {"linux": "linux", "darwin": "darwin", "win32": "windows", "freebsd14": "freebsd"}
        for given, expected in cases.items():
            with self.subTest(given=given):
                self.assertEqual(go_os(given), expected)

    def test_arch(self) -> None:
        cases = {
            "x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm", "i686": "386", "riscv64": "riscv64", "ppc64le": "ppc64le",
            "s390x": "s390x", "mips64el": "mips64le",
        }
        for given, expected in cases.items():
            with self.subTest(given=given):
                self.assertEqual(go_arch(given), expected)
