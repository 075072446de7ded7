"""``twistd nodepass``: run a NodePass server, client or master under twistd.

::

    twistd -n nodepass --master "master://0.0.0.0:9090"
    twistd -n nodepass --server "server://:10101/127.0.0.1:8080"
    twistd -n nodepass "client://server.example:10101/127.0.0.1:8080"

For NodePass-formatted log lines add ``--logger nodepass.log.twistd_observer``
before ``nodepass``.  A master replacing a Go master takes over its state with
``--import-gob /path/to/gob/nodepass.gob`` (see :mod:`nodepass.master.migrate`).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from nodepass import __version__
from nodepass.url import URLError, parse_url

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Command-line options of ``twistd nodepass``."""

    synopsis = "[--server URL | --client URL | --master URL | URL] [--state-dir DIR] [--import-gob PATH]"
    longdesc = (
        "Run one NodePass URL: server://KEY@tunnel_host:port/target_host:port?params, "
        "client://KEY@server_host:port/local_host:port?params or "
        "master://host:port/prefix?log=&tls=&crt=&key= (the management API). "
        f"nodepass {__version__}."
    )
    optParameters = [
        ["server", None, None, "Run a tunnel server from a server:// URL."],
        ["client", None, None, "Run a tunnel client from a client:// URL."],
        ["master", None, None, "Run the management API from a master:// URL."],
        ["state-dir", None, None, "Master state directory (default: $NP_STATE_DIR or the working directory)."],
        [
            "import-gob",
            None,
            None,
            "Go master state file (gob/nodepass.gob, or the directory holding gob/) to import "
            "when the state directory has no state yet (default: $NP_IMPORT_GOB).",
        ],
    ]

    def parseArgs(self, *args: str) -> None:
        if len(args) > 1:
            raise usage.UsageError("give one URL")
        self["url"] = args[0] if args else None

    def postOptions(self) -> None:
        given = [(k, self[k]) for k in ("server", "client", "master") if self[k]]
        if self["url"]:
            given.append(("url", self["url"]))
        if len(given) != 1:
            raise usage.UsageError("give exactly one of --server, --client, --master or a bare URL")
        kind, text = given[0]
        try:
            config = parse_url(text)
        except URLError as exc:
            raise usage.UsageError(f"invalid URL: {exc}") from None
        scheme = text.strip().partition("://")[0].lower()
        if kind != "url" and scheme != kind:
            raise usage.UsageError(f"--{kind} needs a {kind}:// URL, got {scheme}://")
        self["config"] = config
        if self["import-gob"] and scheme != "master":
            raise usage.UsageError("--import-gob applies to a master:// URL only")


def makeService(options: Options) -> IService:
    """Build the service for the parsed options (uses the running twistd reactor)."""
    from twisted.internet import reactor

    from nodepass.allocator import tune_allocator
    from nodepass.cli import _announce_level, repeat_interval
    from nodepass.env import Settings
    from nodepass.log import NodePassLogger
    from nodepass.service import build_service, raise_open_file_limit

    config = options["config"]
    settings = Settings.from_environ()
    logger = NodePassLogger(
        config.log or "info",
        stream=None,
        reactor=reactor,  # type: ignore[arg-type]
        repeat_interval=repeat_interval(config, settings),
    )
    from twisted.logger import globalLogPublisher

    logger.add_twisted_observer(globalLogPublisher)
    reactor.addSystemEventTrigger("after", "shutdown", logger.flush)
    _announce_level(logger, config.log or "info")
    for warning in settings.warnings:
        logger.warn("%s", warning)
    r: Any = reactor
    raise_open_file_limit()
    tune_allocator()
    return build_service(
        config,
        reactor=r,
        logger=logger,
        settings=settings,
        state_dir=options["state-dir"],
        import_gob=options["import-gob"],
    )
