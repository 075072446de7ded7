"""Build the service a NodePass URL describes: a tunnel (server or client) or a master."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService

from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.url import MasterURL, ParsedURL

__all__ = ["build_service", "default_state_dir", "raise_open_file_limit"]


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit of open files to the hard limit, as Go programs do
    at start; return the (soft, hard) limits in force afterwards.

    Every tunnelled connection holds two or three sockets and a pool holds up
    to ``max`` more, so the usual soft limit of 1024 would cap a busy tunnel
    far below what the hard limit (often 524288 under systemd) allows."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return (soft, hard)


def default_state_dir(environ: dict[str, str] | None = None) -> str:
    """Where a master keeps its state: ``NP_STATE_DIR`` or the working directory."""
    env = os.environ if environ is None else environ
    return env.get("NP_STATE_DIR") or os.getcwd()


def build_service(
    config: ParsedURL,
    *,
    reactor: Any,
    logger: NodePassLogger,
    settings: Settings,
    state_dir: str | None = None,
) -> IService:
    """Return the (not yet started) service for *config*."""
    if isinstance(config, MasterURL):
        from nodepass.master.service import make_master_service

        return make_master_service(
            config,
            reactor=reactor,
            logger=logger,
            settings=settings,
            state_dir=state_dir or default_state_dir(),
        )
    from nodepass.tunnel import make_tunnel_service

    return make_tunnel_service(config, reactor=reactor, logger=logger, settings=settings)
