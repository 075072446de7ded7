"""The ``nodepass URL`` command: run one server, client or master like the NodePass binary.

Exactly one argument, a URL.  With none, several, or one that does not
parse, it writes ``Error: <message> [<pid>]`` to standard error, prints a
usage box naming the three URL forms and the version, and exits with status 1.
``-h``/``--help`` prints the usage box and a short help text, ``-v``/``--version``
the version line, both on standard output with status 0.
SIGINT/SIGTERM stop the service gracefully (within ``NP_SHUTDOWN_TIMEOUT``).
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from nodepass.startup import defer_modules

# Before anything imports Twisted: see nodepass.startup.
defer_modules()

from nodepass import __version__  # noqa: E402
from nodepass.env import Settings  # noqa: E402
from nodepass.log import Level, NodePassLogger, parse_level  # noqa: E402
from nodepass.url import USAGE_FORMS, URLError, parse_url  # noqa: E402

__all__ = ["main", "usage_box", "help_text", "version_line"]

HELP_FLAGS = ("-h", "--help")
VERSION_FLAGS = ("-v", "--version")

def _platform() -> str:
    """``<os>/<arch>`` in Go's names, as the NodePass binary shows it (``linux/amd64``)."""
    from nodepass.master.info import go_arch, go_os

    return f"{go_os()}/{go_arch()}"


def version_line() -> str:
    """``nodepass-<version> <os>/<arch> python-<version>``, as ``--version`` prints it."""
    return f"nodepass-{__version__} {_platform()} python-{platform.python_version()}\n"


def help_text() -> str:
    """What ``--help`` prints: the usage box, the URL forms explained, where to read more."""
    return usage_box() + (
        "Run one NodePass tunnel end or master, described by a single URL:\n"
        "\n"
        "  nodepass \"server://[KEY@]tunnel_host:port/target_host:port?params\"\n"
        "  nodepass \"client://[KEY@]server_host:port/local_host:port?params\"\n"
        "  nodepass \"master://host:port[/prefix]?log=&tls=&crt=&key=\"\n"
        "\n"
        "Parameters: log, tls, crt, key, dns, sni, lbs, min, max, mode, type, dial,\n"
        "read, rate, slot, proxy, block, notcp, noudp; tuning through NP_* environment\n"
        "variables. Colours only on a terminal; set NO_COLOR=1 to turn them off.\n"
        "SIGINT/SIGTERM stop gracefully.\n"
        "\n"
        "Options:\n"
        "  -h, --help     show this help and exit\n"
        "  -v, --version  show the version and exit\n"
        "\n"
        "Documentation: docs/configuration.md (parameters, NP_* variables) and\n"
        "docs/api.md (master API) in the nodepass sources; a running master also\n"
        "serves its API reference at <prefix>/v1/docs.\n"
    )


def usage_box() -> str:
    """The usage box: version, platform and the three URL forms."""
    lines_top = [f"nodepass-{__version__}", _platform()]
    width = max(len(s) for s in (*lines_top, *USAGE_FORMS)) + 2
    out = ["", "╭" + "─" * width + "╮"]
    out += [f"│{s.rjust(width - 1)} │" for s in lines_top]
    out.append("├" + "─" * width + "┤")
    out += [f"│ {s.ljust(width - 1)}│" for s in USAGE_FORMS]
    out.append("╰" + "─" * width + "╯")
    out.append("")
    return "\n".join(out) + "\n"


def fail(message: str, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Print the error and the usage box; return the exit status 1."""
    (stderr or sys.stderr).write(f"Error: {message} [{os.getpid()}]\n")
    (stdout or sys.stdout).write(usage_box())
    return 1


def _announce_level(logger: NodePassLogger, level_text: str) -> None:
    level = parse_level(level_text)
    if level not in (Level.INFO, Level.NONE):
        logger.log(level, "Init log level: %s", level.name)


def repeat_interval(config: Any, settings: Settings) -> float:
    """How long repeated lines are summarised for the process's own logger: the
    tunnel's setting for a tunnel; never for a master, whose own lines (an
    instance created, imported, ...) each say something different (its
    instances' loggers summarise, with the same setting)."""
    from nodepass.url import MasterURL

    return 0.0 if isinstance(config, MasterURL) else settings.log_repeat_interval


def main(argv: Sequence[str] | None = None) -> int:
    """Run the URL given on the command line; return the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and args[0] in HELP_FLAGS:
        sys.stdout.write(help_text())
        return 0
    if len(args) == 1 and args[0] in VERSION_FLAGS:
        sys.stdout.write(version_line())
        return 0
    if len(args) != 1:
        return fail("expected exactly one URL argument" if args else "empty URL command")
    try:
        config = parse_url(args[0])
    except URLError as exc:
        return fail(f"invalid URL: {exc}")

    if getattr(config, "scheme", "") in ("server", "client"):
        # A tunnel loads TLS libraries only if it uses them (smaller, starts sooner).
        from nodepass.startup import defer_tls_libraries

        defer_tls_libraries()
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    settings = Settings.from_environ()
    logger = NodePassLogger(
        config.log or "info", reactor=reactor, repeat_interval=repeat_interval(config, settings)
    )
    _announce_level(logger, config.log or "info")
    for warning in settings.warnings:
        logger.warn("%s", warning)

    from nodepass.allocator import tune_allocator
    from nodepass.service import build_service, raise_open_file_limit

    raise_open_file_limit()
    tune_allocator()
    try:
        service: Any = build_service(config, reactor=reactor, logger=logger, settings=settings)
    except Exception as exc:  # a start-up error the URL grammar could not catch
        return fail(str(exc))

    status = {"code": 0}

    def start() -> None:
        try:
            service.startService()
        except Exception as exc:
            logger.error("Start failed: %s", exc)
            status["code"] = 1
            reactor.stop()

    def stop() -> Any:
        if not service.running:
            return None
        from twisted.internet.defer import maybeDeferred

        d = maybeDeferred(service.stopService)
        d.addTimeout(settings.shutdown_timeout, reactor)
        d.addErrback(lambda f: logger.error("Shutdown incomplete: %s", f.getErrorMessage()))
        d.addBoth(lambda _: logger.flush())
        return d

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    # Everything made so far (modules, classes, the service) lives as long as
    # the process: keep it out of the cycle collector's full passes, which
    # otherwise walk all of it again and again under a burst of connections.
    gc.freeze()
    reactor.run()
    return status["code"]


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
