"""Build the service a NodePass URL describes: a tunnel (server or client) or a master."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService

from nodepass.env import Settings
from nodepass.log import NodePassLogger
from nodepass.url import MasterURL, ParsedURL

__all__ = ["build_service", "default_state_dir", "default_import_gob", "raise_open_file_limit"]


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


def default_import_gob(environ: dict[str, str] | None = None) -> str | None:
    """The Go master state file a master imports: ``NP_IMPORT_GOB`` (unset or empty: none)."""
    env = os.environ if environ is None else environ
    return env.get("NP_IMPORT_GOB") or None


def build_service(
    config: ParsedURL,
    *,
    reactor: Any,
    logger: NodePassLogger,
    settings: Settings,
    state_dir: str | None = None,
    import_gob: str | None = None,
) -> IService:
    """Return the (not yet started) service for *config*.

    A server or client also serves its Prometheus metrics when
    ``settings.metrics_addr`` (``NP_METRICS_ADDR``) is set.
    A master keeps its state in *state_dir* (default :func:`default_state_dir`)
    and imports the Go master state named by *import_gob* (default
    :func:`default_import_gob`) when it has none of its own.
    """
    if isinstance(config, MasterURL):
        from nodepass.master.service import make_master_service

        return make_master_service(
            config,
            reactor=reactor,
            logger=logger,
            settings=settings,
            state_dir=state_dir or default_state_dir(),
            import_gob=import_gob or default_import_gob(),
        )
    from nodepass.tunnel import make_tunnel_service

    tunnel = make_tunnel_service(config, reactor=reactor, logger=logger, settings=settings)
    if not settings.metrics_addr:
        return tunnel
    from nodepass.metrics import with_metrics

    return with_metrics(tunnel, settings.metrics_addr, reactor=reactor, logger=logger)
