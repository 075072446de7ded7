"""The API over TLS (tls=1 in-memory certificate, tls=2 files with fallback)."""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from nodepass.tls import client_connection_creator, self_signed_pem
from tests.test_master_support import FakeTunnel, MasterFixture, reactor, start_master


@implementer(IPolicyForHTTPS)
class _NoVerify:
    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return client_connection_creator(1, "")


class TLSTests(TestCase):
    def setUp(self) -> None:
        FakeTunnel.instances = []

    @inlineCallbacks
    def get_info(self, m: MasterFixture) -> Any:
        port = m.service.address[1]
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, contextFactory=_NoVerify(), pool=pool)
        client = treq.client.HTTPClient(agent)
        response = yield client.get(f"https://127.0.0.1:{port}/api/v1/info", headers={"X-API-Key": [m.key]})
        body = yield treq.content(response)
        return response.code, json.loads(body)

    @inlineCallbacks
    def test_tls1_self_signed(self) -> Any:
        m = start_master(self, url="master://127.0.0.1:0?tls=1")
        code, info = yield self.get_info(m)
        self.assertEqual(code, 200)
        self.assertEqual(info["tls"], "1")
        # servers inherit the master's TLS code; clients do not
        inst = m.service.manager.create("server://127.0.0.1:10401/127.0.0.1:10402", "")
        self.assertIn("tls=1", inst.url)
        inst = m.service.manager.create("client://127.0.0.1:10401/127.0.0.1:10403", "")
        self.assertNotIn("tls=", inst.url)

    @inlineCallbacks
    def test_tls2_files_and_fallback(self) -> Any:
        folder = self.mktemp()
        os.makedirs(folder)
        crt_pem, key_pem = self_signed_pem()
        crt, key = os.path.join(folder, "c.pem"), os.path.join(folder, "k.pem")
        with open(crt, "wb") as handle:
            handle.write(crt_pem)
        with open(key, "wb") as handle:
            handle.write(key_pem)
        m = start_master(self, url=f"master://127.0.0.1:0?tls=2&crt={crt}&key={key}")
        code, info = yield self.get_info(m)
        self.assertEqual((code, info["tls"], info["crt"], info["key"]), (200, "2", crt, key))
        bad = start_master(self, url="master://127.0.0.1:0?tls=2&crt=/nonexistent&key=/nonexistent")
        code, info = yield self.get_info(bad)
        self.assertEqual((code, info["tls"]), (200, "1"))
