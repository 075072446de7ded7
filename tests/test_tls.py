"""TLS set-up: RAM certificate, file certificates with reload and fallback, fingerprints."""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from nodepass.log import Level, LogRecord
from nodepass.relay.tls import TLSFactory
from nodepass.tls import (
    ServerTLS,
    client_connection_creator,
    client_ssl_context,
    fingerprint,
    self_signed_pem,
    server_tls,
)
from tests.support import make_cert_files, quiet_logger, reactor


class Capture:
    def __init__(self) -> None:
        self.records: list[LogRecord] = []
        self.logger = quiet_logger("debug", self.records)

    def lines(self, level: Level | None = None) -> list[str]:
        return [r.text for r in self.records if level is None or r.level == level]


class FingerprintTests(unittest.TestCase):
    def test_format(self) -> None:
        fp = fingerprint(b"hello")
        digest = hashlib.sha256(b"hello").hexdigest().upper()
        self.assertEqual(fp, "sha256:" + ":".join(digest[i:i + 2] for i in range(0, 64, 2)))
        self.assertEqual(len(fp), 102)


class RamCertTests(unittest.TestCase):
    def test_self_signed_properties(self) -> None:
        crt_pem, key_pem = self_signed_pem()
        cert = x509.load_pem_x509_certificate(crt_pem)
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(cert.public_key().curve.name, "secp256r1")  # type: ignore[union-attr]
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value, "v1.14.0")
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME), [])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.SERVER_AUTH, list(eku))
        self.assertEqual(self_signed_pem(), (crt_pem, key_pem))  # once per process

    def test_code_1(self) -> None:
        cap = Capture()
        t = server_tls(1, "", "", logger=cap.logger)
        assert t is not None
        self.assertEqual(t.code, 1)
        self.assertEqual(cap.lines(), ["TLS code-1: RAM cert with TLS 1.3"])
        der = x509.load_pem_x509_certificate(self_signed_pem()[0]).public_bytes(serialization.Encoding.DER)
        self.assertEqual(t.fingerprint, fingerprint(der))

    def test_code_0_and_stream_pool(self) -> None:
        cap = Capture()
        self.assertIsNone(server_tls(0, "", "", logger=cap.logger))
        self.assertEqual(cap.records[-1].level, Level.WARN)
        self.assertEqual(cap.records[-1].text, "TLS code-0: unencrypted")
        t = server_tls(0, "", "", pool_type=1, logger=cap.logger)
        assert t is not None
        self.assertEqual(t.code, 1)
        self.assertEqual(cap.lines()[-1], "TLS code-1: RAM cert with TLS 1.3 for stream pool")


class FileCertTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()

    def test_code_2_loads_and_names_cn(self) -> None:
        crt, key, der = make_cert_files(self.dir, cn="tunnel.example")
        cap = Capture()
        t = server_tls(2, crt, key, logger=cap.logger)
        assert t is not None
        self.assertEqual(t.code, 2)
        self.assertEqual(t.fingerprint, fingerprint(der))
        self.assertEqual(cap.lines(), ["TLS code-2: tunnel.example with TLS 1.3"])

    def test_fallback_to_1(self) -> None:
        cap = Capture()
        t = server_tls(2, os.path.join(self.dir, "missing.crt"), os.path.join(self.dir, "missing.key"),
                       logger=cap.logger)
        assert t is not None
        self.assertEqual(t.code, 1)
        self.assertEqual(cap.records[0].level, Level.ERROR)
        self.assertTrue(cap.records[0].text.startswith("Certificate load failed: "))
        self.assertEqual((cap.records[1].level, cap.records[1].text),
                         (Level.WARN, "TLS code-1: RAM cert with TLS 1.3"))

    def test_garbage_file_falls_back(self) -> None:
        crt = os.path.join(self.dir, "bad.crt")
        with open(crt, "wb") as f:
            f.write(b"not a certificate")
        cap = Capture()
        t = server_tls(2, crt, crt, logger=cap.logger)
        assert t is not None
        self.assertEqual(t.code, 1)

    def test_reload_after_interval(self) -> None:
        crt, key, der1 = make_cert_files(self.dir)
        cap = Capture()
        now = [1000.0]
        from nodepass.tls import _load_pair

        cert, pkey, der = _load_pair(crt, key)
        t = ServerTLS(2, cert, pkey, der, crt_file=crt, key_file=key, reload_interval=60.0,
                      clock=lambda: now[0], logger=cap.logger)
        _crt2, _key2, der2 = make_cert_files(self.dir)  # overwrite the files
        t.context()
        self.assertEqual(t.fingerprint, fingerprint(der1))  # not yet due
        now[0] += 61
        t.context()
        self.assertEqual(t.fingerprint, fingerprint(der2))
        self.assertIn("TLS cert reloaded: " + crt, cap.lines(Level.DEBUG))
        # A broken file keeps the last good certificate and logs the failure.
        with open(crt, "wb") as f:
            f.write(b"broken")
        now[0] += 61
        t.context()
        self.assertEqual(t.fingerprint, fingerprint(der2))
        self.assertTrue(any(x.startswith("Certificate reload failed: ") for x in cap.lines(Level.ERROR)))


class ClientCreatorTests(unittest.TestCase):
    def test_codes(self) -> None:
        self.assertIsNone(client_connection_creator(0, "none"))
        self.assertIsNotNone(client_connection_creator(1, "none"))
        self.assertIsNotNone(client_connection_creator(2, "localhost"))


class _Greeter(Protocol):
    """Server side: says ``ok`` once the TLS handshake is through."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"ok")


class _Listener(Protocol):
    """Client side: keeps what arrives; ``done`` fires with it when the connection ends."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


class Code2ClientVerificationTests(unittest.TestCase):
    """Our tls=2 client against a real TLS server: the chain must be trusted (``SSL_CERT_FILE``) and
    the certificate's subjectAltName must match ``sni``, as the Go client requires; a refusal fails
    the connection without a traceback (trial turns a logged traceback into an error)."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        old = os.environ.get("SSL_CERT_FILE")
        self.addCleanup(lambda: os.environ.__setitem__("SSL_CERT_FILE", old) if old is not None
                        else os.environ.pop("SSL_CERT_FILE", None))

    @defer.inlineCallbacks
    def handshake(self, cert: tuple[str, str], trusted: str, name: str = "localhost") -> Any:
        """What the client got from a server using *cert*, trusting the file *trusted*, asking for *name*."""
        crt, key = cert
        os.environ["SSL_CERT_FILE"] = trusted
        creator = server_tls(2, crt, key, logger=quiet_logger())
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(creator, False, Factory.forProtocol(_Greeter)),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Listener()
        factory = TLSMemoryBIOFactory(client_connection_creator(2, name), True,
                                      ClientFactory.forProtocol(lambda: client))
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        got = yield client.done
        return got

    def pair(self, sub: str, **kwargs: Any) -> tuple[str, str]:
        os.makedirs(os.path.join(self.dir, sub))
        crt, key, _der = make_cert_files(os.path.join(self.dir, sub), **kwargs)
        return crt, key

    @defer.inlineCallbacks
    def test_trusted_and_named(self) -> Any:
        cert = self.pair("good")
        got = yield self.handshake(cert, cert[0])
        self.assertEqual(got, b"ok")

    @defer.inlineCallbacks
    def test_untrusted_refused(self) -> Any:
        cert, other = self.pair("good"), self.pair("other")
        got = yield self.handshake(cert, other[0])
        self.assertEqual(got, b"")

    @defer.inlineCallbacks
    def test_other_name_refused(self) -> Any:
        cert = self.pair("good")
        got = yield self.handshake(cert, cert[0], name="elsewhere.example")
        self.assertEqual(got, b"")

    @defer.inlineCallbacks
    def test_no_subject_alt_name_refused(self) -> Any:
        """Regression: a trusted certificate naming the host only in its CN used to pass, with a
        traceback logged for every connection."""
        cert = self.pair("cn-only", cn="localhost", names=())
        got = yield self.handshake(cert, cert[0])
        self.assertEqual(got, b"")


class LeanCode2ClientVerificationTests(Code2ClientVerificationTests):
    """The same rules on the lean TLS layer that carries TCP pool connections
    (:mod:`nodepass.relay.tls` with the standard library's contexts)."""

    @defer.inlineCallbacks
    def handshake(self, cert: tuple[str, str], trusted: str, name: str = "localhost") -> Any:
        crt, key = cert
        os.environ["SSL_CERT_FILE"] = trusted
        server = server_tls(2, crt, key, logger=quiet_logger())
        assert server is not None
        port = reactor.listenTCP(0, TLSFactory(server.ssl_context, True, Factory.forProtocol(_Greeter)),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _Listener()
        factory = TLSFactory(client_ssl_context(2, name), False, ClientFactory.forProtocol(lambda: client), name)
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        got = yield client.done
        return got
