"""A short run of ``bench/soak.py``: a leak check under mixed, churning load (no timing).

The full soak (30 minutes, results in docs/reliability.md) is the same
script with its default duration.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.support import new_dir
from tests.test_process import ROOT, spawn

SOAK = os.path.join(ROOT, "bench", "soak.py")


class SoakTests(TestCase):
    timeout = 400

    @inlineCallbacks
    def test_soak_60s(self) -> Any:
        """60 s of TCP + UDP churn through a server + client pair: right data, and resident memory,
        descriptors (besides idle pool connections) and timers flat after a 20 s warm-up."""
        # lighter than the 30-minute soak: the suite runs other tests beside it on the same CPUs
        args = [SOAK, "--duration", "60", "--period", "15", "--warmup", "20", "--churn", "2", "--udp", "1",
                "--pause", "0.05"]
        proc = spawn(self, args, new_dir(self))
        status = yield proc.wait_exit(timeout=300)
        print("\n" + proc.text)
        self.assertEqual(status, (0, None), proc.text)
        self.assertIn("verdict: flat", proc.text)
        self.assertIn("wrong data: 0", proc.text)
