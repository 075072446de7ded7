"""Tuning knobs read from ``NP_*`` environment variables, as NodePass names them.

Every value has NodePass's default.  Integers must be base-10 and ``>= 0``;
durations use Go syntax (``250ms``, ``5s``, ``1h30m``) and must be ``>= 0``.
An invalid value falls back to the default, as NodePass does, and is reported
in :attr:`Settings.warnings` so the caller can log it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from nodepass.durations import parse_duration

__all__ = ["Settings", "ENV_NAMES"]


@dataclass(frozen=True)
class Settings:
    """NodePass run-time settings; durations are float seconds."""

    semaphore_limit: int = 65536
    tcp_data_buf_size: int = 16384
    udp_data_buf_size: int = 16384
    handshake_timeout: float = 5.0
    tcp_dial_timeout: float = 5.0
    udp_dial_timeout: float = 5.0
    udp_read_timeout: float = 30.0
    pool_get_timeout: float = 5.0
    min_pool_interval: float = 0.1
    max_pool_interval: float = 1.0
    report_interval: float = 5.0
    log_repeat_interval: float = 10.0
    service_cooldown: float = 3.0
    shutdown_timeout: float = 5.0
    reload_interval: float = 3600.0
    fallback_interval: float = 300.0
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from *environ* (default ``os.environ``)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        warnings: list[str] = []
        for f in fields(cls):
            if f.name == "warnings":
                continue
            name = ENV_NAMES[f.name]
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                if f.type in ("int", int):
                    number = int(raw, 10)
                    if number < 0:
                        raise ValueError("negative")
                    values[f.name] = number
                else:
                    seconds = parse_duration(raw)
                    if seconds < 0:
                        raise ValueError("negative")
                    values[f.name] = seconds
            except ValueError:
                warnings.append(f"{name}={raw!r} is invalid; using the default")
        return cls(**values, warnings=tuple(warnings))  # type: ignore[arg-type]


ENV_NAMES: dict[str, str] = {
    "semaphore_limit": "NP_SEMAPHORE_LIMIT",
    "tcp_data_buf_size": "NP_TCP_DATA_BUF_SIZE",
    "udp_data_buf_size": "NP_UDP_DATA_BUF_SIZE",
    "handshake_timeout": "NP_HANDSHAKE_TIMEOUT",
    "tcp_dial_timeout": "NP_TCP_DIAL_TIMEOUT",
    "udp_dial_timeout": "NP_UDP_DIAL_TIMEOUT",
    "udp_read_timeout": "NP_UDP_READ_TIMEOUT",
    "pool_get_timeout": "NP_POOL_GET_TIMEOUT",
    "min_pool_interval": "NP_MIN_POOL_INTERVAL",
    "max_pool_interval": "NP_MAX_POOL_INTERVAL",
    "report_interval": "NP_REPORT_INTERVAL",
    "log_repeat_interval": "NP_LOG_REPEAT_INTERVAL",
    "service_cooldown": "NP_SERVICE_COOLDOWN",
    "shutdown_timeout": "NP_SHUTDOWN_TIMEOUT",
    "reload_interval": "NP_RELOAD_INTERVAL",
    "fallback_interval": "NP_FALLBACK_INTERVAL",
}
