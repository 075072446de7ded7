"""A fault-injecting TCP + UDP relay for the fault tests, run as a helper process.

The kernel here has no ``netem``, so delay, loss, stalls and resets between
two tunnel ends come from this relay, placed between them (toxics in the
manner of toxiproxy)::

    python -m tests.faultrelay --tcp LISTEN_PORT:HOST:PORT --udp LISTEN_PORT:HOST:PORT ...

Each ``--tcp`` / ``--udp`` listens on 127.0.0.1 (``--host``) and forwards to
``HOST:PORT``.  Once listening it prints ``ready tcp|udp LISTEN_PORT`` per
relay.  Faults are set, for all relays and for connections already open,
with JSON lines on standard input, e.g. ``{"latency": 50, "jitter": 10}``:

* ``latency`` / ``jitter`` (ms): every chunk (TCP) or datagram (UDP) waits
  ``latency ± jitter`` (uniform) in each direction.  TCP chunks keep their
  order: a chunk is never released before the one read ahead of it.
* ``loss`` (0-1): the probability that a datagram is dropped, per direction
  (UDP only; TCP loss is the kernel's business and is not modelled here).
* ``stall`` (``"up"``, ``"down"``, ``"both"`` or ``null``): TCP bytes in that
  direction (``up`` = from the accepted side to the target) are held, not
  forwarded, until the stall is lifted; then they flow in order.
* ``reset_after`` (bytes or ``null``): a TCP connection that has carried this
  many bytes (both directions together) is reset on both sides.
* ``"stats": true`` prints one JSON line of counters (connections, bytes,
  dropped datagrams, resets).

A TCP direction holding more than 1 MiB stops reading from its source until
it drained below 256 KiB, so the relay does not buffer a whole transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import protocol, stdio
from twisted.internet.protocol import DatagramProtocol
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10
UDP_SESSION_IDLE = 60.0


class Faults:
    """The current toxics and the counters of all relays."""

    def __init__(self, seed: int | None = None) -> None:
        self.latency = 0.0
        self.jitter = 0.0
        self.loss = 0.0
        self.stall: str | None = None
        self.reset_after: int | None = None
        self.rng = random.Random(seed)
        self.stats = {"tcp_conns": 0, "tcp_bytes": 0, "resets": 0, "udp_in": 0, "udp_dropped": 0, "udp_out": 0}
        self.listeners: list[Callable[[], None]] = []

    def update(self, changes: dict[str, Any]) -> None:
        for name in ("latency", "jitter", "loss"):
            if name in changes:
                setattr(self, name, float(changes[name]))
        if "stall" in changes:
            self.stall = changes["stall"]
        if "reset_after" in changes:
            self.reset_after = None if changes["reset_after"] is None else int(changes["reset_after"])
        for notify in list(self.listeners):
            notify()

    def delay(self) -> float:
        """Seconds one chunk or datagram waits now."""
        if self.latency <= 0 and self.jitter <= 0:
            return 0.0
        ms = self.latency + self.rng.uniform(-self.jitter, self.jitter)
        return max(0.0, ms) / 1000.0

    def stalled(self, direction: str) -> bool:
        return self.stall in (direction, "both")

    def drop(self) -> bool:
        return self.loss > 0 and self.rng.random() < self.loss


class _Direction:
    """Ordered, delayed delivery of one TCP direction with back-pressure on its source."""

    def __init__(self, reactor: Any, faults: Faults, name: str, pair: _Pair) -> None:
        self.reactor = reactor
        self.faults = faults
        self.name = name
        self.pair = pair
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.last_release = 0.0
        self.timer: Any = None
        self.source: Any = None
        self.sink: Any = None
        self.paused = False
        self.eof = False

    def push(self, data: bytes) -> None:
        release = max(self.reactor.seconds() + self.faults.delay(), self.last_release)
        self.last_release = release
        self.queue.append((release, data))
        self.queued += len(data)
        if self.queued > HIGH_WATER and not self.paused and self.source is not None:
            self.paused = True
            self.source.pauseProducing()
        self.kick()

    def finish(self) -> None:
        self.eof = True
        self.kick()

    def kick(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.sink is None or self.faults.stalled(self.name) or self.pair.done:
            return
        now = self.reactor.seconds()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            self.queued -= len(data)
            self.sink.write(data)
            self.pair.carried(len(data))
            if self.pair.done:
                return
        if self.paused and self.queued < LOW_WATER and self.source is not None:
            self.paused = False
            self.source.resumeProducing()
        if self.queue:
            self.timer = self.reactor.callLater(self.queue[0][0] - now, self.kick)
        elif self.eof:
            self.sink.loseConnection()

    def cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class _Pair:
    """One relayed TCP connection: the accepted side and the side dialled to the target."""

    def __init__(self, reactor: Any, faults: Faults) -> None:
        self.reactor = reactor
        self.faults = faults
        self.up = _Direction(reactor, faults, "up", self)
        self.down = _Direction(reactor, faults, "down", self)
        self.bytes = 0
        self.done = False
        self.lost = 0
        self.sides: list[Any] = []
        faults.listeners.append(self.refresh)

    def refresh(self) -> None:
        self.up.kick()
        self.down.kick()

    def carried(self, n: int) -> None:
        self.bytes += n
        self.faults.stats["tcp_bytes"] += n
        limit = self.faults.reset_after
        if limit is not None and self.bytes >= limit and not self.done:
            self.faults.stats["resets"] += 1
            self.close(abort=True)

    def side_lost(self) -> None:
        """One side closed; once both have, the pair is forgotten."""
        self.lost += 1
        if self.lost >= 2:
            self.close()

    def close(self, abort: bool = False) -> None:
        if self.done:
            return
        self.done = True
        if self.refresh in self.faults.listeners:
            self.faults.listeners.remove(self.refresh)
        self.up.cancel()
        self.down.cancel()
        for side in self.sides:
            if side is not None:
                side.abortConnection() if abort else side.loseConnection()


class _Outbound(protocol.Protocol):
    def __init__(self, pair: _Pair, inbound: _Inbound) -> None:
        self.pair = pair
        self.inbound = inbound

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pair.sides.append(self.transport)
        self.pair.up.sink = self.transport
        self.pair.down.source = self.transport
        self.pair.up.kick()

    def dataReceived(self, data: bytes) -> None:
        self.pair.down.push(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.pair.down.finish()
        self.pair.side_lost()


class _Inbound(protocol.Protocol):
    def __init__(self, factory: TcpRelayFactory) -> None:
        self.relay = factory
        self.pair = _Pair(factory.reactor, factory.faults)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.relay.faults.stats["tcp_conns"] += 1
        self.pair.sides.append(self.transport)
        self.pair.up.source = self.transport
        self.pair.down.sink = self.transport
        pair, inbound = self.pair, self

        class Once(protocol.ClientFactory):
            noisy = False

            def buildProtocol(self, addr: Any) -> protocol.Protocol:
                return _Outbound(pair, inbound)

            def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
                pair.side_lost()
                pair.close(abort=True)

        self.relay.reactor.connectTCP(self.relay.host, self.relay.port, Once(), timeout=10)

    def dataReceived(self, data: bytes) -> None:
        self.pair.up.push(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.pair.up.finish()
        self.pair.side_lost()


class TcpRelayFactory(protocol.Factory):
    noisy = False

    def __init__(self, reactor: Any, faults: Faults, host: str, port: int) -> None:
        self.reactor = reactor
        self.faults = faults
        self.host = host
        self.port = port

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return _Inbound(self)


class UdpRelay(DatagramProtocol):
    """Datagrams from each source address go out through a socket of their own."""

    def __init__(self, reactor: Any, faults: Faults, host: str, port: int, interface: str) -> None:
        self.reactor = reactor
        self.faults = faults
        self.target = (host, port)
        self.interface = interface
        self.sessions: dict[Any, tuple[Any, list[Any]]] = {}

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.faults.stats["udp_in"] += 1
        session = self.sessions.get(addr)
        if session is None:
            back = _UdpBack(self, addr)
            port = self.reactor.listenUDP(0, back, interface=self.interface, maxPacketSize=65536)
            session = (port, [self.reactor.seconds()])
            self.sessions[addr] = session
            self.reactor.callLater(UDP_SESSION_IDLE, self._expire, addr)
        port, seen = session
        seen[0] = self.reactor.seconds()
        self._later(lambda: port.write(datagram, self.target))

    def reply(self, datagram: bytes, addr: Any) -> None:
        self._later(lambda: self.transport.write(datagram, addr))  # type: ignore[union-attr]

    def _later(self, send: Callable[[], Any]) -> None:
        if self.faults.drop():
            self.faults.stats["udp_dropped"] += 1
            return
        self.faults.stats["udp_out"] += 1
        delay = self.faults.delay()
        if delay:
            self.reactor.callLater(delay, send)
        else:
            send()

    def _expire(self, addr: Any) -> None:
        session = self.sessions.get(addr)
        if session is None:
            return
        port, seen = session
        idle = self.reactor.seconds() - seen[0]
        if idle >= UDP_SESSION_IDLE:
            del self.sessions[addr]
            port.stopListening()
        else:
            self.reactor.callLater(UDP_SESSION_IDLE - idle, self._expire, addr)


class _UdpBack(DatagramProtocol):
    def __init__(self, relay: UdpRelay, addr: Any) -> None:
        self.relay = relay
        self.addr = addr

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.relay.reply(datagram, self.addr)


class _Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    def lineReceived(self, line: bytes) -> None:
        try:
            changes = json.loads(line)
        except ValueError:
            return
        report = changes.pop("stats", False)
        self.faults.update(changes)
        if report:
            self.sendLine(json.dumps(self.faults.stats).encode())

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        from twisted.internet import reactor

        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]


def _spec(text: str) -> tuple[int, str, int]:
    listen, host, port = text.rsplit(":", 2)
    return int(listen), host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fault-injecting TCP/UDP relay (test helper)")
    parser.add_argument("--host", default="127.0.0.1", help="address the relays listen on")
    parser.add_argument("--tcp", action="append", default=[], type=_spec, metavar="LISTEN:HOST:PORT")
    parser.add_argument("--udp", action="append", default=[], type=_spec, metavar="LISTEN:HOST:PORT")
    parser.add_argument("--faults", default="{}", help="initial faults as JSON")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    faults = Faults(args.seed)
    faults.update(json.loads(args.faults))
    lines: list[str] = []
    for listen, host, port in args.tcp:
        p = reactor.listenTCP(listen, TcpRelayFactory(reactor, faults, host, port), backlog=1024, interface=args.host)
        lines.append(f"ready tcp {p.getHost().port}")
    for listen, host, port in args.udp:
        p = reactor.listenUDP(listen, UdpRelay(reactor, faults, host, port, args.host), interface=args.host,
                              maxPacketSize=65536)
        lines.append(f"ready udp {p.getHost().port}")
    stdio.StandardIO(_Control(faults))
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- the test side ----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RelayProcess(protocol.ProcessProtocol):
    """A running relay: its ports (``tcp_ports``, ``udp_ports``, in argument order) and controls."""

    def __init__(self) -> None:
        self.tcp_ports: list[int] = []
        self.udp_ports: list[int] = []
        self.replies: list[dict[str, int]] = []
        self.output = b""
        self.ended = False

    def outReceived(self, data: bytes) -> None:
        self.output += data
        while b"\n" in self.output:
            line, self.output = self.output.split(b"\n", 1)
            text = line.decode("utf-8", "replace").strip()
            if text.startswith("ready tcp "):
                self.tcp_ports.append(int(text.split()[-1]))
            elif text.startswith("ready udp "):
                self.udp_ports.append(int(text.split()[-1]))
            elif text.startswith("{"):
                self.replies.append(json.loads(text))

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.ended = True

    def set(self, **faults: Any) -> Any:
        """Change the faults (see the module docstring), for open connections too; the Deferred
        fires with the relay's counters once the relay applied the change."""
        from tests.support import wait_for

        seen = len(self.replies)
        self.transport.write(json.dumps({**faults, "stats": True}).encode() + b"\n")  # type: ignore[union-attr]
        return wait_for(lambda: len(self.replies) > seen, timeout=20).addCallback(lambda _: self.replies[-1])

    def stats(self) -> Any:
        """A Deferred firing with the relay's counters."""
        return self.set()


def start_relay(
    test: Any,
    *,
    tcp: Sequence[tuple[str, int]] = (),
    udp: Sequence[tuple[str, int]] = (),
    faults: dict[str, Any] | None = None,
    prefix: list[str] | None = None,
    host: str = "127.0.0.1",
) -> Any:
    """Spawn a relay forwarding to each of *tcp* / *udp*; fires with the :class:`RelayProcess`
    once every relay listens.  *prefix* runs it under another command (``ip netns exec NAME``).
    Killed at the test's cleanup."""
    import os

    from tests.support import reactor, wait_for

    args = [sys.executable, "-m", "tests.faultrelay", "--host", host, "--faults", json.dumps(faults or {})]
    args += [a for h, p in tcp for a in ("--tcp", f"0:{h}:{p}")]
    args += [a for h, p in udp for a in ("--udp", f"0:{h}:{p}")]
    if prefix:
        args = [*prefix, *args]
    proc = RelayProcess()
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    reactor.spawnProcess(proc, args[0], args, env=env, path=ROOT)

    def cleanup() -> Any:
        if not proc.ended:
            proc.transport.signalProcess("KILL")  # type: ignore[union-attr]
            return wait_for(lambda: proc.ended, timeout=20)
        return None

    test.addCleanup(cleanup)
    return wait_for(
        lambda: len(proc.tcp_ports) == len(tcp) and len(proc.udp_ports) == len(udp) or proc.ended,
        timeout=30, what="relay ready",
    ).addCallback(lambda _: proc)
