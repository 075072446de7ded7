"""Master mode: the REST + SSE management API that runs tunnel instances in-process.

``make_master_service(config, *, reactor, logger, settings, state_dir)`` builds
the service for a ``master://host:port/prefix?log=&tls=&crt=&key=`` URL; see
:mod:`nodepass.master.service`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["make_master_service", "MasterService"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that ``nodepass.master.<module>`` can be used alone.
    if name in __all__:
        from nodepass.master import service

        return getattr(service, name)
    raise AttributeError(name)
