"""Generic helpers shared by the test modules: free ports, polling, echo targets, raw
clients, quiet loggers, fast settings and throw-away TLS certificates.

This module holds no test cases of its own. Everything runs on the global
reactor against real sockets on the loopback interface.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.interfaces import IHostResolution
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from nodepass.env import Settings
from nodepass.log import Level, LogRecord, NodePassLogger

reactor: Any = _reactor

FAST = Settings(report_interval=0.2, service_cooldown=0.2, handshake_timeout=2.0, pool_get_timeout=2.0)
"""Settings for in-process tunnels: quick reports and restarts, short handshake and pool waits."""

ECHO_BACKLOG = 1024
"""Listen backlog of the echo targets, so bursts of connections are never refused."""


# -- ports ----------------------------------------------------------------------------------
def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """*count* distinct port numbers currently free for both TCP and UDP on *host*.

    Every probe socket stays bound until all ports are chosen, so one call never
    returns the same number twice. *host* may be an IPv6 literal such as ``::1``.
    Raises RuntimeError when no such ports are found after many attempts.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(50 * count):
            if len(ports) == count:
                break
            t = socket.socket(family, socket.SOCK_STREAM)
            held.append(t)
            u = socket.socket(family, socket.SOCK_DGRAM)
            held.append(u)
            try:
                t.bind((host, 0))
                port = int(t.getsockname()[1])
                u.bind((host, port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(ports) < count:
        raise RuntimeError(f"no {count} free TCP+UDP ports on {host}")
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One port number currently free for both TCP and UDP on *host*."""
    return free_ports(1, host)[0]


# -- files -------------------------------------------------------------------------------------------
def new_dir(test: unittest.TestCase) -> str:
    """The absolute path of a new, empty directory from ``test.mktemp()``."""
    path = os.path.abspath(str(test.mktemp()))  # type: ignore[no-untyped-call]
    os.makedirs(path)
    return path


# -- time ---------------------------------------------------------------------------------------
def sleep(seconds: float) -> defer.Deferred[None]:
    """A Deferred that fires after *seconds* on the reactor."""
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition", step: float = 0.02) -> Any:
    """Poll *cond* every *step* seconds until it returns a true value, and return that value.

    Fails with AssertionError naming *what* once more than *timeout* seconds of
    polling have passed.
    """
    waited = 0.0
    while True:
        value = cond()
        if value:
            return value
        if waited > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        yield sleep(step)
        waited += step


# -- loggers ------------------------------------------------------------------------------------
def quiet_logger(level: str = "debug", records: list[LogRecord] | None = None) -> NodePassLogger:
    """A logger that writes nothing; its records at/above *level* are appended to *records* if given."""
    logger = NodePassLogger(level, stream=None)
    if records is not None:
        logger.add_observer(records.append)
    return logger


def recording_logger(level: str = "debug") -> tuple[NodePassLogger, list[LogRecord]]:
    """A quiet logger and the list its records (at/above *level*) are appended to."""
    records: list[LogRecord] = []
    return quiet_logger(level, records), records


class NamedLogs:
    """Records of several named quiet loggers, kept in arrival order as ``(name, record)``."""

    def __init__(self) -> None:
        self.records: list[tuple[str, LogRecord]] = []

    def logger(self, name: str, level: str = "debug") -> NodePassLogger:
        """A quiet logger whose records are kept under *name*."""
        logger = NodePassLogger(level, stream=None)
        logger.add_observer(lambda r: self.records.append((name, r)))
        return logger

    def texts(self, who: str, level: Level | None = None) -> list[str]:
        """Texts logged under *who* (only those at exactly *level* if given)."""
        return [r.text for n, r in self.records if n == who and (level is None or r.level == level)]

    def has(self, who: str, fragment: str, level: Level | None = None) -> bool:
        """Whether a text logged under *who* (at exactly *level* if given) contains *fragment*."""
        return any(fragment in t for t in self.texts(who, level))


# -- targets -----------------------------------------------------------------------------------
class Echo(Protocol):
    """TCP echo: writes back every chunk, after ``prefix`` (empty by default)."""

    prefix = b""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self.prefix + data)


class UdpEcho(DatagramProtocol):
    """UDP echo: answers every datagram to its sender, after ``prefix``; keeps them in ``got``."""

    prefix = b""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.got.append(datagram)
        assert self.transport is not None
        self.transport.write(self.prefix + datagram, addr)  # type: ignore[call-arg]


def echo_server(test: unittest.TestCase, port: int = 0, interface: str = "127.0.0.1",
                protocol: type[Protocol] = Echo) -> int:
    """Listen with *protocol* (a TCP echo) on *interface*:*port*, large backlog; stopped at cleanup.

    Returns the port number actually bound.
    """
    listener = reactor.listenTCP(port, Factory.forProtocol(protocol), backlog=ECHO_BACKLOG, interface=interface)
    test.addCleanup(listener.stopListening)
    return int(listener.getHost().port)


def silent_listener(test: unittest.TestCase, backlog: int = 16) -> socket.socket:
    """A plain listening socket on 127.0.0.1 that never reads or writes unless the test does so.

    The kernel completes connects to it (up to *backlog*); closed at cleanup.
    """
    sock = socket.socket()
    test.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


# -- users -----------------------------------------------------------------------------------------
class RawClient(Protocol):
    """A raw TCP client: sends *send* once connected, collects every byte, notices the close."""

    def __init__(self, send: bytes = b"") -> None:
        self.send = send
        self.data = b""
        self.lost = False
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.send:
            assert self.transport is not None
            self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self.closed.callback(None)

    @property
    def local_port(self) -> int:
        """The client's own port number."""
        return int(self.transport.getHost().port)  # type: ignore[union-attr]


def connect(port: int, proto: Protocol, bind: str | None = None, timeout: float = 5.0) -> defer.Deferred[Any]:
    """Connect *proto* to 127.0.0.1:*port* (from *bind* if given).

    The Deferred fires with *proto* once it is connected (after ``connectionMade``),
    or fails with the connection error.
    """
    d: defer.Deferred[Any] = defer.Deferred()

    class OneShot(ClientFactory):
        def buildProtocol(self, addr: Any) -> Protocol:
            def connected() -> None:
                if not d.called:
                    d.callback(proto)

            reactor.callLater(0, connected)
            return proto

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            d.errback(reason)

    kw: dict[str, Any] = {"bindAddress": (bind, 0)} if bind else {}
    reactor.connectTCP("127.0.0.1", port, OneShot(), timeout=timeout, **kw)
    return d


@defer.inlineCallbacks
def echo_roundtrip(port: int, payload: bytes, timeout: float = 20.0) -> Any:
    """Send *payload* to an echo behind 127.0.0.1:*port*; return what came back, once it is as long.

    The connect is retried every 0.3 s while the listener is not open yet;
    gives up (re-raising the connect error, or AssertionError when the echo
    stays short) after *timeout* seconds.
    """
    waited = 0.0
    while True:
        proto = RawClient()
        try:
            yield connect(port, proto)
        except Exception:
            if waited > timeout:
                raise
            yield sleep(0.3)
            waited += 0.3
            continue
        assert proto.transport is not None
        proto.transport.write(payload)

        def echoed(p: RawClient = proto) -> bool:
            return len(p.data) >= len(payload)

        try:
            yield wait_for(echoed, timeout=timeout)
        finally:
            proto.transport.loseConnection()
        return proto.data


class UdpUser(DatagramProtocol):
    """A UDP user: keeps every reply in ``replies``; :meth:`ask` waits for the next one."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.waiting: list[defer.Deferred[bytes]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.replies.append(datagram)
        while self.waiting:
            d = self.waiting.pop(0)
            if not d.called:  # skip questions that already timed out
                d.callback(datagram)
                break

    def ask(self, data: bytes, port: int, timeout: float = 5.0, host: str = "127.0.0.1") -> defer.Deferred[bytes]:
        """Send *data* to *host*:*port*; fires with the next reply, fails with TimeoutError after *timeout*."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting.append(d)

        def drop(result: Any) -> Any:
            if d in self.waiting:
                self.waiting.remove(d)
            return result

        assert self.transport is not None
        self.transport.write(data, (host, port))  # type: ignore[call-arg]
        return d.addTimeout(timeout, reactor).addErrback(drop)


def udp_user(test: unittest.TestCase, interface: str = "127.0.0.1") -> UdpUser:
    """A :class:`UdpUser` bound to an ephemeral port on *interface*; stopped at cleanup."""
    user = UdpUser()
    listener = reactor.listenUDP(0, user, interface=interface, maxPacketSize=65536)
    test.addCleanup(listener.stopListening)
    return user


# -- name resolution ------------------------------------------------------------------------------
@implementer(IHostResolution)
class FakeResolution:
    """The resolution handle a fake resolver hands to ``resolutionBegan``; cancelling does nothing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


# -- TLS --------------------------------------------------------------------------------------------
def make_cert_files(directory: str, cn: str = "localhost", names: tuple[str, ...] = ("localhost",)) -> tuple[str, str, bytes]:
    """Write a self-signed cert/key pair for ``names`` (no subjectAltName at all when empty);
    returns (crt path, key path, DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    crt_path = os.path.join(directory, "tls.crt")
    key_path = os.path.join(directory, "tls.key")
    with open(crt_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return crt_path, key_path, cert.public_bytes(serialization.Encoding.DER)
