"""TLS set-up for pool connections (and the master API), as NodePass does it.

Server side (:func:`server_tls`):

* code 0: no TLS (WARN ``TLS code-0: unencrypted``), unless the pool type
  needs TLS (1 QUIC, 3 HTTP/2), which forces code 1;
* code 1: an in-memory self-signed certificate (ECDSA P-256, random 128-bit
  serial, Subject O = the version string, no CN or SAN, valid for one year,
  server-auth EKU), generated once per process, TLS 1.3 minimum;
* code 2: certificate and key from PEM files, re-read during a TLS handshake
  once ``reload_interval`` has passed since the last load.  If the first load
  fails: ERROR ``Certificate load failed: ...`` then WARN
  ``TLS code-1: RAM cert with TLS 1.3`` and code 1 is used.

Client side (:func:`client_connection_creator`): code 1 encrypts without
verification and sends no SNI; code 2 verifies the chain against the platform
trust store, or against the PEM bundle named by the ``SSL_CERT_FILE``
environment variable when it is set, and the name (``sni``, also sent as SNI)
against the certificate's subjectAltName; like Go, it refuses a certificate
that has none.

Fingerprints (:func:`fingerprint`) are ``sha256:`` + the upper-case hex byte
pairs of SHA-256 over the certificate DER, joined by ``:``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

from nodepass.log import NodePassLogger

if TYPE_CHECKING:
    from OpenSSL import SSL, crypto

# pyOpenSSL, ``cryptography`` and Twisted's TLS support are imported where
# they are used: a tls=0 tunnel never needs them, a tls=1 one needs only
# ``cryptography`` to make its certificate (see nodepass.startup).

__all__ = [
    "VERSION",
    "ServerTLS",
    "server_tls",
    "self_signed_pem",
    "fingerprint",
    "fingerprint_of_x509",
    "client_connection_creator",
    "TLSLoadError",
]

VERSION = "v1.14.0"


class TLSLoadError(Exception):
    """A certificate or key file could not be loaded."""


def fingerprint(der: bytes) -> str:
    """``sha256:AA:BB:...`` of a DER certificate."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def fingerprint_of_x509(cert: Any) -> str:
    """Fingerprint of a certificate object: pyOpenSSL X509, twisted Certificate,
    cryptography Certificate, or DER bytes."""
    if isinstance(cert, bytes):
        return fingerprint(cert)
    if hasattr(cert, "original"):
        cert = cert.original
    public_bytes = getattr(cert, "public_bytes", None)
    if public_bytes is not None:  # a cryptography Certificate
        from cryptography.hazmat.primitives import serialization

        return fingerprint(public_bytes(serialization.Encoding.DER))
    from OpenSSL import crypto

    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    return fingerprint(der)


_RAM_CERT: tuple[bytes, bytes] | None = None


def self_signed_pem(version: str = VERSION) -> tuple[bytes, bytes]:
    """The process-wide in-memory certificate: (cert PEM, key PEM)."""
    global _RAM_CERT
    if _RAM_CERT is None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, version)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 or 1)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        _RAM_CERT = (
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    return _RAM_CERT


def _load_pair(crt_file: str, key_file: str) -> tuple[Any, Any, bytes]:
    """Load (X509, PKey, leaf DER) from PEM files; raises TLSLoadError."""
    try:
        with open(crt_file, "rb") as f:
            crt_pem = f.read()
        with open(key_file, "rb") as f:
            key_pem = f.read()
    except OSError as exc:
        raise TLSLoadError(f"open {exc.filename}: {exc.strerror}") from None
    return _load_pem(crt_pem, key_pem)


def _load_pem(crt_pem: bytes, key_pem: bytes) -> tuple[Any, Any, bytes]:
    from OpenSSL import SSL, crypto

    try:
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, crt_pem)
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error as exc:
        raise TLSLoadError(f"tls: failed to parse certificate or key PEM data: {exc}") from None
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    # Chain certificates after the leaf, if any.
    chain = []
    marker = b"-----BEGIN CERTIFICATE-----"
    parts = crt_pem.split(marker)[2:]
    for part in parts:
        try:
            chain.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + part))
        except crypto.Error:
            pass
    ctx = SSL.Context(SSL.TLS_METHOD)
    try:
        ctx.use_certificate(cert)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise TLSLoadError(f"tls: private key does not match public key: {exc}") from None
    return (cert, key, der) if not chain else ((cert, chain), key, der)


def _server_context(cert: Any, key: Any) -> SSL.Context:
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET)
    # An idle pool connection then holds no record buffers (tens of kB each).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    chain: list[Any] = []
    if isinstance(cert, tuple):
        cert, chain = cert
    ctx.use_certificate(cert)
    for extra in chain:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server TLS state: effective code, current certificate, fingerprint.

    ``fingerprint`` is the SHA-256 fingerprint of the certificate the server
    presents right now.  For code 2 the files are re-read when a handshake
    starts and ``reload_interval`` seconds have passed since the last load.
    """

    def __init__(
        self,
        code: int,
        cert: Any,
        key: Any,
        der: bytes,
        *,
        crt_file: str = "",
        key_file: str = "",
        reload_interval: float = 3600.0,
        clock: Callable[[], float] | None = None,
        logger: NodePassLogger | None = None,
    ) -> None:
        import time

        self.code = code
        self._clock = clock or time.monotonic
        self._crt_file = crt_file
        self._key_file = key_file
        self._reload_interval = reload_interval
        self._logger = logger
        self._last_load = self._clock()
        self._set(cert, key, der)

    def _set(self, cert: Any, key: Any, der: bytes) -> None:
        # ``cert``/``key``: pyOpenSSL objects (``cert`` may be ``(leaf, chain)``),
        # or PEM bytes; the pyOpenSSL form and its context are made when first
        # needed (the lean pool TLS never needs them).
        self._source = (cert, key)
        self._objects: tuple[Any, Any] | None = None if isinstance(cert, bytes) else (cert, key)
        self._context: SSL.Context | None = None
        self._ssl_contexts: dict[tuple[bytes, ...], ssl.SSLContext] = {}
        self._alpn_contexts: dict[tuple[bytes, ...], SSL.Context] = {}
        self.der = der
        self.fingerprint = fingerprint(der)

    def _openssl(self) -> tuple[Any, Any]:
        """(certificate, key) as pyOpenSSL objects."""
        if self._objects is None:
            cert, key, _der = _load_pem(*self._source)
            self._objects = (cert, key)
        return self._objects

    def _maybe_reload(self) -> None:
        if self.code != 2 or not self._crt_file:
            return
        now = self._clock()
        if now - self._last_load < self._reload_interval:
            return
        self._last_load = now
        try:
            cert, key, der = _load_pair(self._crt_file, self._key_file)
        except TLSLoadError as exc:
            if self._logger is not None:
                self._logger.error("Certificate reload failed: %s", exc)
            return
        self._set(cert, key, der)
        if self._logger is not None:
            self._logger.debug("TLS cert reloaded: %s", self._crt_file)

    def context(self, alpn: tuple[bytes, ...] = ()) -> SSL.Context:
        """The SSL context for a new server connection (reloading first if due).

        With ``alpn``, the context selects the first of those protocols that
        the client offers, and none when it offers none of them (the
        transport then decides what to do with such a client)."""
        from OpenSSL import SSL

        self._maybe_reload()
        if not alpn:
            if self._context is None:
                self._context = _server_context(*self._openssl())
            return self._context
        ctx = self._alpn_contexts.get(alpn)
        if ctx is None:
            ctx = _server_context(*self._openssl())

            def select(conn: SSL.Connection, offered: list[bytes]) -> Any:
                for proto in alpn:
                    if proto in offered:
                        return proto
                return SSL.NO_OVERLAPPING_PROTOCOLS

            ctx.set_alpn_select_callback(select)
            self._alpn_contexts[alpn] = ctx
        return ctx

    def pem(self) -> tuple[bytes, bytes]:
        """(certificate chain PEM, private key PEM) of the certificate served now."""
        self._maybe_reload()
        cert, key = self._source
        if isinstance(cert, bytes):
            return cert, key  # type: ignore[return-value]
        from OpenSSL import crypto

        leaf, chain = (cert, []) if not isinstance(cert, tuple) else cert
        crt = b"".join(crypto.dump_certificate(crypto.FILETYPE_PEM, c) for c in [leaf, *chain])
        return crt, crypto.dump_privatekey(crypto.FILETYPE_PEM, key)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        from OpenSSL import SSL

        conn = SSL.Connection(self.context(), None)
        conn.set_accept_state()
        return conn

    def ssl_context(self, alpn: tuple[bytes, ...] = ()) -> ssl.SSLContext:
        """The same certificate as a standard-library context (the lean pool TLS
        layer, :mod:`nodepass.relay.tls`), one per ``alpn`` tuple, rebuilt after
        a reload.

        With ``alpn``, the server selects the first of those protocols that the
        client offers, and none when it offers none of them (the handshake still
        completes; the transport then decides what to do with such a client)."""
        self._maybe_reload()
        ctx = self._ssl_contexts.get(alpn)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.options |= ssl.OP_NO_TICKET
            # No session tickets: pool connections are never resumed, and each
            # ticket costs memory on both ends for as long as the connection lives.
            ctx.num_tickets = 0
            crt, key = self.pem()
            _load_chain_from_memory(ctx, crt, key)
            ctx.sni_callback = _remember_server_name
            if alpn:
                ctx.set_alpn_protocols([p.decode("ascii") for p in alpn])
            self._ssl_contexts[alpn] = ctx
        return ctx

    def with_alpn(self, *protocols: bytes) -> IOpenSSLServerConnectionCreator:
        """A connection creator for TLSMemoryBIOFactory that negotiates ``protocols``."""
        return _AlpnServer(self, tuple(protocols))


@implementer(IOpenSSLServerConnectionCreator)
class _AlpnServer:
    def __init__(self, tls: ServerTLS, alpn: tuple[bytes, ...]) -> None:
        self._tls = tls
        self._alpn = alpn

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        from OpenSSL import SSL

        conn = SSL.Connection(self._tls.context(self._alpn), None)
        conn.set_accept_state()
        return conn


def _remember_server_name(sslobj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
    """Keep the SNI a client sent on its connection (``sni_name``), for logs and tests."""
    sslobj.sni_name = name


def _load_chain_from_memory(ctx: ssl.SSLContext, crt: bytes, key: bytes) -> None:
    """``load_cert_chain`` from PEM bytes, through an anonymous in-memory file where
    the system has them (nothing touches the disk), else a private temporary file."""
    import tempfile

    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("nodepass-cert", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, crt + b"\n" + key)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass
        finally:
            os.close(fd)
    with tempfile.NamedTemporaryFile() as f:
        os.chmod(f.name, 0o600)
        f.write(crt + b"\n" + key)
        f.flush()
        ctx.load_cert_chain(f.name)


def server_tls(
    code: int,
    crt_file: str,
    key_file: str,
    *,
    pool_type: int = 0,
    logger: NodePassLogger,
    reload_interval: float = 3600.0,
    version: str = VERSION,
) -> ServerTLS | None:
    """Pick the server TLS set-up for ``tls=code`` and log it like NodePass.

    Returns None for code 0 (plain TCP).
    """

    def ram(message: str, warn: bool = False) -> ServerTLS:
        crt_pem, key_pem = self_signed_pem(version)
        der = ssl.PEM_cert_to_DER_cert(crt_pem.decode("ascii"))
        (logger.warn if warn else logger.info)(message)
        return ServerTLS(1, crt_pem, key_pem, der, logger=logger)

    if code == 1:
        return ram("TLS code-1: RAM cert with TLS 1.3")
    if code == 2:
        try:
            cert, key, der = _load_pair(crt_file, key_file)
        except TLSLoadError as exc:
            logger.error("Certificate load failed: %s", exc)
            return ram("TLS code-1: RAM cert with TLS 1.3", warn=True)
        leaf = cert[0] if isinstance(cert, tuple) else cert
        # Go prints the common name of the parsed leaf (possibly empty).
        logger.info("TLS code-2: %s with TLS 1.3", leaf.get_subject().CN or "")
        return ServerTLS(
            2, cert, key, der, crt_file=crt_file, key_file=key_file,
            reload_interval=reload_interval, logger=logger,
        )
    if pool_type in (1, 3):
        return ram("TLS code-1: RAM cert with TLS 1.3 for stream pool")
    logger.warn("TLS code-0: unencrypted")
    return None


def _trust_root() -> Any:
    from twisted.internet import ssl as tssl

    bundle = os.environ.get("SSL_CERT_FILE", "")
    if bundle:
        with open(bundle, "rb") as f:
            data = f.read()
        marker = b"-----BEGIN CERTIFICATE-----"
        certs = [
            tssl.Certificate.loadPEM(marker + part)
            for part in data.split(marker)[1:]
        ]
        if certs:
            return tssl.trustRootFromCertificates(certs)  # type: ignore[no-untyped-call]
    return tssl.platformTrust()  # type: ignore[no-untyped-call]


@implementer(IOpenSSLClientConnectionCreator)
class _NoVerifyClient:
    """TLS 1.3 client without certificate verification and without SNI."""

    def __init__(self, alpn: tuple[bytes, ...] = ()) -> None:
        from OpenSSL import SSL

        self._ctx = SSL.Context(SSL.TLS_METHOD)
        self._ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        self._ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
        self._ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        if alpn:
            self._ctx.set_alpn_protos(list(alpn))

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        from OpenSSL import SSL

        conn = SSL.Connection(self._ctx, None)
        conn.set_connect_state()
        return conn


@implementer(IOpenSSLClientConnectionCreator)
class _VerifyingClient:
    """TLS 1.3 client for code 2: the chain must lead to *trust_root* and the certificate's
    subjectAltName must match *server_name* (sent as SNI unless it is an IP address);
    *alpn* lists the application protocols to offer.

    A certificate without any subjectAltName is refused, as Go refuses it.  A
    refusal fails the TLS handshake (``certificate verify failed``); nothing
    is logged from inside OpenSSL's callback.
    """

    def __init__(self, server_name: str, trust_root: Any, alpn: tuple[bytes, ...] = ()) -> None:
        from service_identity.hazmat import DNS_ID, IPAddress_ID
        from twisted.internet import ssl as tssl
        from twisted.internet.abstract import isIPAddress, isIPv6Address

        options = tssl.CertificateOptions(trustRoot=trust_root, raiseMinimumTo=tssl.TLSVersion.TLSv1_3,
                                          acceptableProtocols=list(alpn) or None)
        self._ctx = options.getContext()
        is_ip = isIPAddress(server_name) or isIPv6Address(server_name)
        self._sni = b"" if is_ip else server_name.encode("idna")
        self._ids = [IPAddress_ID(server_name) if is_ip else DNS_ID(server_name)]

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, err: int, depth: int, ok: int) -> bool:
        if not ok:
            return False
        if depth != 0:
            return True
        from service_identity.hazmat import verify_service_identity
        from service_identity.pyopenssl import extract_patterns

        try:
            verify_service_identity(extract_patterns(cert), self._ids, [])
        except Exception:  # VerificationError, or CertificateError when there is no subjectAltName
            return False
        return True

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        from OpenSSL import SSL

        conn = SSL.Connection(self._ctx, None)
        if self._sni:
            conn.set_tlsext_host_name(self._sni)
        conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        conn.set_connect_state()
        return conn


_CLIENT_CACHE: dict[tuple[int, str, str, tuple[bytes, ...]], Any] = {}
_SSL_CLIENT_CACHE: dict[tuple[int, str, str, tuple[bytes, ...]], ssl.SSLContext] = {}


def client_ssl_context(code: int, server_name: str, alpn: tuple[bytes, ...] = ()) -> ssl.SSLContext | None:
    """The standard-library client context for pool code 1 or 2 (None for 0),
    with the same rules as :func:`client_connection_creator`: code 1 does not
    verify (give it no ``server_hostname``: no SNI); code 2 verifies the chain
    (``SSL_CERT_FILE``, else the system's trust store) and the name given as
    ``server_hostname``, against subjectAltName entries only.  ``alpn`` lists
    the application protocols to offer."""
    if code not in (1, 2):
        return None
    bundle = os.environ.get("SSL_CERT_FILE", "")
    key = (code, server_name if code == 2 else "", bundle, alpn)
    ctx = _SSL_CLIENT_CACHE.get(key)
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if code == 1:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            # Only subjectAltName names count, as for a NodePass (Go) client.
            ctx.hostname_checks_common_name = False
            if bundle:
                ctx.load_verify_locations(cafile=bundle)
            else:
                ctx.load_default_certs()
        if alpn:
            ctx.set_alpn_protocols([p.decode("ascii") for p in alpn])
        _SSL_CLIENT_CACHE[key] = ctx
    return ctx


def client_connection_creator(code: int, server_name: str, alpn: tuple[bytes, ...] = ()) -> Any:
    """The client TLS connection creator for pool code 1 or 2 (None for 0).

    Code 1 does not verify and sends no SNI; code 2 verifies the chain and
    ``server_name``.  ``alpn`` lists the application protocols to offer."""
    if code not in (1, 2):
        return None
    key = (code, server_name if code == 2 else "", os.environ.get("SSL_CERT_FILE", ""), alpn)
    cached = _CLIENT_CACHE.get(key)
    if cached is not None:
        return cached
    if code == 1:
        creator: Any = _NoVerifyClient(alpn)
    else:
        creator = _VerifyingClient(server_name, _trust_root(), alpn)
    _CLIENT_CACHE[key] = creator
    return creator
