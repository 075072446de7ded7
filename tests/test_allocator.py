"""nodepass.allocator: glibc malloc thresholds set once at start."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from twisted.trial import unittest

from nodepass.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_allocator

GLIBC = platform.libc_ver()[0] == "glibc"

_PROBE = "import json; from nodepass.allocator import tune_allocator; print(json.dumps(tune_allocator()))"


def _run(env_extra: dict[str, str]) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=60,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(out.stdout)  # type: ignore[no-any-return]


class TuneAllocatorTests(unittest.TestCase):
    def setUp(self) -> None:
        if not GLIBC:
            raise unittest.SkipTest("the thresholds are glibc's")

    def test_sets_both_thresholds(self) -> None:
        self.assertEqual(_run({}), {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD,
                                    "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD})

    def test_leaves_a_threshold_the_environment_sets(self) -> None:
        self.assertEqual(_run({"MALLOC_MMAP_THRESHOLD_": "131072"}), {"MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD})
        self.assertEqual(_run({"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "262144"}), {})

    def test_calling_again_is_harmless(self) -> None:
        self.assertIsInstance(tune_allocator(), dict)


class NonGlibcTests(unittest.TestCase):
    def test_other_c_libraries_are_left_alone(self) -> None:
        self.patch(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
        self.assertEqual(tune_allocator(), {})
