"""TCP reachability probes for the master API's ``GET /tcping``.

A probe makes one TCP connection attempt to ``host:port`` and reports whether
it succeeded, how long it took and, on failure, an error text worded like the
Go dialer's (``dial tcp 127.0.0.1:1: connect: connection refused``), so
dashboards that show these strings see familiar text.

At most ``limit`` probes run at once across all API clients; one more is
refused synchronously with :class:`TcpingBusy`.  Each probe (name resolution
included) is bounded by ``timeout`` seconds and then reports
``i/o timeout``.  Nothing blocks the reactor: names are resolved through the
reactor's own resolver and the connection is made with ``connectTCP``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.net import join_host_port

__all__ = ["Tcping", "TcpingBusy", "TcpingResult", "split_target"]

#: The JSON object returned for one probe:
#: ``{"target": str, "connected": bool, "latency": int, "error": str | None}``.
TcpingResult = dict[str, object]

BUSY_MESSAGE = "too many requests"


class TcpingBusy(Exception):
    """Raised by :meth:`Tcping.probe` when every probe slot is taken."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{BUSY_MESSAGE}: at most {limit} probes may run at once")
        self.limit = limit


def split_target(target: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into a host and a port number.

    Follows the rules of Go's ``net.SplitHostPort``; the port may be a number
    (0-65535) or a TCP service name such as ``http``.  Raises ``ValueError``
    with a message naming the problem for anything else.
    """
    if not target:
        raise ValueError("Target address required")
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            raise ValueError(f"address {target}: missing ']' in address")
        host = target[1:end]
        rest = target[end + 1 :]
        if not rest:
            raise ValueError(f"address {target}: missing port in address")
        if not rest.startswith(":"):
            raise ValueError(f"address {target}: unexpected text after ']' in address")
        port_text = rest[1:]
        if "[" in host or "]" in port_text or "[" in port_text:
            raise ValueError(f"address {target}: unexpected bracket in address")
    else:
        colon = target.rfind(":")
        if colon < 0:
            raise ValueError(f"address {target}: missing port in address")
        host, port_text = target[:colon], target[colon + 1 :]
        if ":" in host:
            raise ValueError(
                f"address {target}: too many colons in address "
                "(write IPv6 addresses as [addr]:port)"
            )
        if "[" in host or "]" in host:
            raise ValueError(f"address {target}: unexpected bracket in address")
    if not port_text:
        raise ValueError(f"address {target}: missing port in address")
    return host, _parse_port(target, port_text)


def _parse_port(target: str, text: str) -> int:
    if text.isascii() and text.isdigit():  # "٣" is no port number, as for Go
        port = int(text)
        if port > 65535:
            raise ValueError(f"address {target}: invalid port {text} (must be 0-65535)")
        return port
    try:
        return socket.getservbyname(text, "tcp")
    except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate in the name
        raise ValueError(f"address {target}: unknown port {text}") from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _connect_error_text(address: str, reason: Failure) -> str:
    """Word a connection failure the way the Go dialer does."""
    value = reason.value
    if isinstance(value, ierror.TimeoutError):
        return f"dial tcp {address}: i/o timeout"
    if isinstance(value, ierror.ConnectError):
        code = value.osError
        if isinstance(code, int):
            text = os.strerror(code)
            return f"dial tcp {address}: connect: {text[:1].lower()}{text[1:]}"
        if isinstance(value, ierror.ConnectionRefusedError):
            return f"dial tcp {address}: connect: connection refused"
        if isinstance(value, ierror.NoRouteError):
            return f"dial tcp {address}: connect: no route to host"
        detail = value.args[0] if value.args and value.args[0] else type(value).__name__
        return f"dial tcp {address}: connect: {detail}"
    return f"dial tcp {address}: {value}"


class _ProbeProtocol(Protocol):
    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt

    def connectionMade(self) -> None:
        self.attempt.connected(self)


class _ProbeFactory(ClientFactory):
    noisy = False

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _ProbeProtocol(self.attempt)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.attempt.failed(reason)


@implementer(IResolutionReceiver)
class _Receiver:
    """Collects the addresses of one name resolution."""

    def __init__(self, done: Deferred[list[str]]) -> None:
        self.done = done
        self.addresses: list[str] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)):
            if address.host not in self.addresses:
                self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.addresses)


class _Attempt:
    """One probe: resolve, then try each address in turn until one connects.

    Fires ``result`` exactly once, with the error of the first failed address
    (as Go reports) when none connects, or with an ``i/o timeout`` when the
    deadline passes first.
    """

    def __init__(
        self,
        reactor: Any,
        target: str,
        host: str,
        port: int,
        timeout: float,
        release: Callable[[], None],
    ) -> None:
        self.reactor = reactor
        self.release = release
        self.target = target
        self.host = host
        self.port = port
        self.result: Deferred[TcpingResult] = Deferred(lambda _d: self.cancel())
        self.started = cast(IReactorTime, reactor).seconds()
        self.finished = False
        self.connector: IConnector | None = None
        self.addresses: list[str] = []
        self.first_error: str | None = None
        self.current: str | None = None
        self.timer: IDelayedCall = cast(IReactorTime, reactor).callLater(
            timeout, self.timed_out
        )

    def start(self) -> None:
        if _is_ip(self.host):
            self.resolved([self.host])
            return
        lookup_host = self.host or "localhost"
        try:
            lookup_host.encode("idna")
        except UnicodeError:
            # No DNS name can be spelt so; the system resolver would fail with
            # an encoding error outside any answer (Go: "no such host").
            self.resolved([])
            return
        done: Deferred[list[str]] = Deferred()
        done.addCallback(self.resolved)
        resolver = self._resolver()
        if resolver is None:
            self.resolved([lookup_host])
            return
        try:
            resolver.resolveHostName(_Receiver(done), lookup_host, self.port)
        except Exception as exc:  # a resolver refusing the name outright
            self.finish(False, f"dial tcp: lookup {self.host}: {exc}")

    def _resolver(self) -> IHostnameResolver | None:
        if IReactorPluggableNameResolver.providedBy(self.reactor):
            resolver: IHostnameResolver = self.reactor.nameResolver
            return resolver
        return None

    def resolved(self, addresses: Sequence[str]) -> None:
        if self.finished:
            return
        if not addresses:
            self.finish(False, f"dial tcp: lookup {self.host}: no such host")
            return
        self.addresses = list(addresses)
        self.next_address()

    def next_address(self) -> None:
        if not self.addresses:
            self.finish(False, self.first_error or f"dial tcp {self.target}: connect failed")
            return
        self.current = self.addresses.pop(0)
        remaining = max(
            0.001, self.timer.getTime() - cast(IReactorTime, self.reactor).seconds()
        )
        try:
            self.connector = cast(IReactorTCP, self.reactor).connectTCP(
                self.current, self.port, _ProbeFactory(self), timeout=remaining + 1.0
            )
        except Exception as exc:
            self.failed(Failure(exc))  # type: ignore[no-untyped-call]

    def connected(self, protocol: Protocol) -> None:
        transport = protocol.transport
        if transport is not None:
            transport.loseConnection()
        self.finish(True, None)

    def failed(self, reason: Failure) -> None:
        if self.finished:
            return
        text = _connect_error_text(join_host_port(self.current or self.host, self.port), reason)
        if self.first_error is None:
            self.first_error = text
        self.next_address()

    def timed_out(self) -> None:
        if self.finished:
            return
        address = join_host_port(self.current, self.port) if self.current else None
        if address is None:
            text = f"dial tcp: lookup {self.host}: i/o timeout"
        else:
            text = f"dial tcp {address}: i/o timeout"
        self.finish(False, text)
        self._stop_connecting()

    def cancel(self) -> None:
        """Abandon the probe (its Deferred was cancelled): free the slot."""
        if self.finished:
            return
        self._close()
        self._stop_connecting()

    def _stop_connecting(self) -> None:
        connector, self.connector = self.connector, None
        if connector is not None:
            try:
                connector.stopConnecting()
            except ierror.NotConnectingError:
                pass

    def _close(self) -> None:
        self.finished = True
        if self.timer.active():
            self.timer.cancel()
        self.release()

    def finish(self, connected: bool, error_text: str | None) -> None:
        if self.finished:
            return
        self._close()
        latency = 0
        if connected:
            elapsed = cast(IReactorTime, self.reactor).seconds() - self.started
            latency = max(0, int(elapsed * 1000))
        self.result.callback(
            {
                "target": self.target,
                "connected": connected,
                "latency": latency,
                "error": error_text,
            }
        )


class Tcping:
    """Runs TCP probes with a shared concurrency limit.

    ``reactor`` must provide ``IReactorTCP`` and ``IReactorTime``; when it also
    provides ``IReactorPluggableNameResolver`` its resolver turns host names
    into addresses.  ``limit`` probes may be in flight at once; ``timeout``
    bounds each probe (resolution plus connect), in seconds.
    """

    def __init__(self, reactor: Any, limit: int = 10, timeout: float = 5.0) -> None:
        if limit < 1:
            raise ValueError("tcping limit must be at least 1")
        if timeout <= 0:
            raise ValueError("tcping timeout must be positive")
        self._reactor = reactor
        self.limit = limit
        self.timeout = timeout
        self._in_flight = 0

    def _release(self) -> None:
        self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        """How many probes are running now."""
        return self._in_flight

    def probe(self, target: str) -> Deferred[TcpingResult]:
        """Probe ``target`` (``host:port``) once.

        Returns a Deferred that always succeeds with
        ``{"target": target, "connected": bool, "latency": ms, "error": str|None}``;
        ``latency`` is the whole milliseconds from the start of the probe to
        the established connection (name resolution included) and 0 on
        failure.  The connection is closed as soon as it is established.

        Raises ``ValueError`` (nothing is started) when ``target`` is empty or
        not ``host:port``, and :class:`TcpingBusy` when ``limit`` probes are
        already running.
        """
        host, port = split_target(target)
        if self._in_flight >= self.limit:
            raise TcpingBusy(self.limit)
        self._in_flight += 1
        attempt = _Attempt(
            self._reactor, target, host, port, self.timeout, self._release
        )
        attempt.start()
        return attempt.result
