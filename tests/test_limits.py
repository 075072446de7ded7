"""A tunnel process raises its open-file soft limit to the hard limit, as Go programs do."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

from twisted.trial import unittest

from tests.support import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _soft_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


class OpenFileLimitTests(unittest.TestCase):
    def test_soft_limit_raised_to_hard(self) -> None:
        if not os.path.exists("/proc/self/limits"):
            raise unittest.SkipTest("needs /proc/<pid>/limits")
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard <= 256:
            raise unittest.SkipTest(f"hard open-file limit {hard} leaves nothing to raise")

        def lower() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

        tunnel, target = free_ports(2)
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodepass", f"server://k@127.0.0.1:{tunnel}/127.0.0.1:{target}?log=warn"],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), preexec_fn=lower,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        deadline = time.monotonic() + 30
        expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
        seen = 256
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _soft_limit(proc.pid)
            if seen == expected:
                break
            time.sleep(0.05)
        self.assertEqual(seen, expected)
