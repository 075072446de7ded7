"""Faults that need a second host: a network partition, a target name that stops resolving.

One end runs in a network namespace of its own (:class:`tests.netns.Link`),
joined to this one by a veth pair with a ``tc tbf`` bandwidth limit.  The
tests skip, with the reason, where namespaces cannot be made (not root, no
``ip``/``tc``).
"""

from __future__ import annotations

import re
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from tests.netns import Link, process_fds
from tests.support import RawClient, connect, echo_server, free_port, new_dir, sleep, wait_for
from tests.test_faults import FAST_ENV, RECOVERY_BOUND, errors_since, measured, pid_of, start_end, until_echo
from tests.test_process import MasterClient, spawn

PARTITION = 20.0
"""How long the link stays down (seconds)."""
FD_SLACK = 8
"""Descriptors (beyond idle pool connections) a process may hold above its count before the partition."""
_POOL = re.compile(r"CHECK_POINT\|MODE=\d\|PING=\d+ms\|POOL=(\d+)")


def last_pool(lines: list[str]) -> int:
    """POOL of the last CHECK_POINT line."""
    for line in reversed(lines):
        match = _POOL.search(line)
        if match:
            return int(match.group(1))
    return 0


class PartitionTests(TestCase):
    """The server end is on the other side of a link that goes down for 20 s."""

    timeout = 300

    @inlineCallbacks
    def test_partition_and_heal(self) -> Any:
        """Link down 20 s: the client instance of a master goes to ``error`` within the health
        window, the ends restart as designed, traffic flows again after the link is back, the
        master shows ``running`` again (SSE), and no descriptors are left behind."""
        link = Link(self)
        link.limit("100mbit")
        work = new_dir(self)
        target = free_port(link.near)
        echo_server(self, target, interface=link.near)
        tunnel = 10101
        server = start_end(
            self, f"server://part@{link.far}:{tunnel}/{link.near}:{target}?mode=2&log=info", work, prefix=link.prefix
        )
        yield server.wait_line("Pending tunnel handshake")

        master = spawn(self, ["-m", "nodepass", "master://127.0.0.1:0/api?log=info"], work, **FAST_ENV)
        api = yield MasterClient(self, master).connect()
        events = yield api.subscribe()
        local = free_port()
        code, created = yield api.call(
            "POST", "/instances", {"url": f"client://part@{link.far}:{tunnel}/127.0.0.1:{local}?min=8&log=info"}
        )
        self.assertEqual(code, 201, created)
        iid = created["id"]
        yield until_echo(local)

        def status_events() -> list[str]:
            return [e["instance"]["status"] for e in events.of_type("update", iid)]

        yield wait_for(lambda: "running" in status_events(), timeout=30, what="instance running (SSE)")
        yield wait_for(lambda: last_pool(server.lines) >= 8, timeout=30, what="server pool filled")
        instance = (yield api.instances())[iid]
        before = {
            "master": process_fds(pid_of(master)) - instance["pool"],
            "server": process_fds(pid_of(server)) - last_pool(server.lines),
        }
        seen = len(events.events)
        mark = len(server.lines)

        link.down()
        start = time.monotonic()

        def went_error() -> bool:
            return any(e["type"] == "update" and e["instance"]["id"] == iid and e["instance"]["status"] == "error"
                       for e in events.events[seen:])

        yield wait_for(went_error, timeout=RECOVERY_BOUND, what="instance in error (SSE)", step=0.05)
        measured("partition noticed by the client (master instance error)", time.monotonic() - start)
        yield wait_for(lambda: errors_since(server, mark), timeout=RECOVERY_BOUND, what="server notices")
        measured("partition noticed by the server", time.monotonic() - start)
        yield server.wait_line("Server restart", timeout=RECOVERY_BOUND)  # and waits for a new handshake
        while time.monotonic() - start < PARTITION:  # the master keeps answering meanwhile
            code, _ = yield api.call("GET", f"/instances/{iid}")
            self.assertEqual(code, 200)
            yield sleep(1.0)
        user = RawClient(b"anyone?")
        try:  # a user is refused (the session's listener is closed between restarts) or closed
            yield connect(local, user)
            yield wait_for(lambda: user.lost, timeout=RECOVERY_BOUND, what="user closed during the partition")
        except ConnectionRefusedError:
            pass

        seen = len(events.events)
        link.up()
        healed = time.monotonic()
        took = yield until_echo(local)
        measured("link back to traffic", took)

        def back_running() -> bool:
            return any(e["type"] == "update" and e["instance"]["id"] == iid and e["instance"]["status"] == "running"
                       for e in events.events[seen:])

        yield wait_for(back_running, timeout=RECOVERY_BOUND, what="instance running again (SSE)")
        measured("link back to instance running (SSE)", time.monotonic() - healed)
        code, body = yield api.call("GET", f"/instances/{iid}")
        self.assertEqual((code, body["status"]), (200, "running"))
        self.assertTrue(server.running and master.running)

        def fds_now() -> dict[str, int]:
            pool = api_pool[0]
            return {
                "master": process_fds(pid_of(master)) - pool,
                "server": process_fds(pid_of(server)) - last_pool(server.lines),
            }

        api_pool = [0]

        @inlineCallbacks
        def settled() -> Any:
            for _ in range(40):
                api_pool[0] = (yield api.instances())[iid]["pool"]
                now = fds_now()
                if all(now[k] <= before[k] + FD_SLACK for k in before):
                    return now
                yield sleep(0.5)
            return fds_now()

        after = yield settled()
        print(f"\n  measured: descriptors besides idle pool connections, before -> after: {before} -> {after}")
        for name in before:
            self.assertLessEqual(after[name], before[name] + FD_SLACK, (name, before, after))


class ResolutionTests(TestCase):
    """The egress end runs in a namespace whose ``/etc/hosts`` the test rewrites."""

    timeout = 180

    @inlineCallbacks
    def test_target_name_stops_and_starts_resolving(self) -> Any:
        """Unknown name: users are closed and the log names it; once it resolves traffic flows;
        when it stops resolving again the last answer is used (logged)."""
        link = Link(self)
        # No name server reachable inside: a query fails at once, and nothing leaves the namespace.
        link.etc_file("resolv.conf", "nameserver 127.0.0.1\n")
        hosts = "127.0.0.1 localhost\n"
        link.etc_file("hosts", hosts)
        work = new_dir(self)
        target = free_port(link.near)
        echo_server(self, target, interface=link.near)
        user, tunnel = free_port(), free_port(link.near)
        server = start_end(self, f"server://dns@{link.near}:{tunnel}/127.0.0.1:{user}?mode=1&log=info", work)
        yield server.wait_line("Pending tunnel handshake")
        client = start_end(
            self, f"client://dns@{link.near}:{tunnel}/np-target.test:{target}?mode=2&dns=1s&min=4&log=info", work,
            prefix=link.prefix,
        )
        yield client.wait_line("Marking tunnel handshake as complete")
        yield server.wait_line("Marking tunnel handshake as complete")
        marks = len(server.lines), len(client.lines)

        users = [RawClient(b"hello") for _ in range(3)]
        for u in users:
            yield connect(user, u)
        yield wait_for(lambda: all(u.lost for u in users), timeout=60, what="users closed")
        self.assertEqual([u.data for u in users], [b""] * 3)
        failure = yield client.wait_line(r"(ERROR|WARN).*np-target\.test")
        print(f"\n  logged: {failure.string.strip()}")

        link.etc_file("hosts", hosts + f"{link.near} np-target.test\n")
        took = yield until_echo(user)
        measured("name resolvable again to traffic", took)

        link.etc_file("hosts", hosts)
        yield sleep(1.5)  # past the dns=1s cache
        mark = len(client.lines)
        took = yield until_echo(user)
        self.assertLess(took, RECOVERY_BOUND)
        line = yield wait_for(lambda: [x for x in client.lines[mark:] if "np-target.test" in x], timeout=30,
                              what="a log line about the failed lookup")
        print(f"  logged: {line[0].strip()}")
        self.assertEqual(errors_since(server, marks[0]) + errors_since(client, marks[1]), [])
        self.assertTrue(server.running and client.running)
