"""The ``nodepass`` command and the ``twistd nodepass`` plugin, run as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from twisted.trial import unittest

from nodepass import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def _editable_install() -> bool:
    """Whether nodepass is installed in development (editable) mode."""
    import json
    from importlib import metadata

    try:
        text = metadata.distribution("nodepass").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return False
    return bool(text and json.loads(text).get("dir_info", {}).get("editable"))


class UsageTests(unittest.TestCase):
    def check_usage(self, result: subprocess.CompletedProcess[str], words: str) -> None:
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"nodepass-{__version__}", result.stdout)
        for form in ("server://password@host/host?<query>", "client://password@host/host?<query>",
                     "master://hostname:port/path?<query>"):
            self.assertIn(form, result.stdout)
        self.assertRegex(result.stderr, r"^Error: .* \[\d+\]\n$")
        self.assertIn(words, result.stderr)

    def test_no_argument(self) -> None:
        self.check_usage(run("-m", "nodepass"), "empty URL")

    def test_two_arguments(self) -> None:
        self.check_usage(run("-m", "nodepass", "a", "b"), "exactly one URL")

    def test_bad_url(self) -> None:
        self.check_usage(run("-m", "nodepass", "server://:10101/127.0.0.1:80?max=lots"), "max")

    def test_unknown_scheme(self) -> None:
        self.check_usage(run("-m", "nodepass", "ftp://x:1/y:2"), "unknown scheme")


class HelpVersionTests(unittest.TestCase):
    """``--help`` / ``--version`` (and ``-h`` / ``-v``) in a pipe: standard output, status 0."""

    def test_help(self) -> None:
        for flag in ("--help", "-h"):
            result = run("-m", "nodepass", flag)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stderr, "")
            self.assertIn(f"nodepass-{__version__}", result.stdout)
            self.assertIn("│ master://hostname:port/path?<query> │", result.stdout)
            self.assertIn("-h, --help", result.stdout)
            self.assertIn("NO_COLOR", result.stdout)
            self.assertNotIn("\x1b[", result.stdout)

    def test_version(self) -> None:
        for flag in ("--version", "-v"):
            result = run("-m", "nodepass", flag)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stderr, "")
            self.assertRegex(result.stdout, rf"^nodepass-{re.escape(__version__)} \w+/\w+ python-[\d.]+\S*\n$")

    def test_flags_only_alone(self) -> None:
        """A flag next to another argument is no flag: the usual usage error."""
        result = run("-m", "nodepass", "--help", "server://:1/a:2")
        self.assertEqual(result.returncode, 1)
        self.assertIn("exactly one URL", result.stderr)
        result = run("-m", "nodepass", "--helpme")
        self.assertEqual(result.returncode, 1)


class PluginTests(unittest.TestCase):
    def test_plugin_discoverable(self) -> None:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        names = {p.tapname for p in getPlugins(IServiceMaker)}
        if "nodepass" not in names and _editable_install():
            raise unittest.SkipTest("an editable install does not place the plugin in twisted/plugins")
        self.assertIn("nodepass", names)

    def test_options(self) -> None:
        from twisted.python.usage import UsageError

        from nodepass.tap import Options
        from nodepass.url import MasterURL, TunnelURL

        opts = Options()
        opts.parseOptions(["--master", "master://127.0.0.1:0"])
        self.assertIsInstance(opts["config"], MasterURL)
        opts = Options()
        opts.parseOptions(["server://:10101/127.0.0.1:8080"])
        self.assertIsInstance(opts["config"], TunnelURL)
        for bad in (["--server", "client://h:1/a:2"], [], ["--server", "server://h/x"],
                    ["--client", "client://h:1/a:2", "server://h:1/a:2"]):
            with self.subTest(args=bad):
                self.assertRaises(UsageError, Options().parseOptions, bad)

    def test_twistd_help_documents_the_options(self) -> None:
        if _editable_install():
            raise unittest.SkipTest("an editable install does not place the plugin in twisted/plugins")
        result = run("-m", "twisted", "nodepass", "--help")
        for words in ("--server", "--client", "--master", "--state-dir"):
            self.assertIn(words, result.stdout)
