"""The NodePass URL grammar: ``server://``, ``client://`` and ``master://``.

::

    server://[KEY@]tunnel_host:port/target_host:port[,target...]?params
    client://[KEY@]server_host:port/local_host:port[,target...]?params
    master://host:port[/prefix]?log=&tls=&crt=&key=

:func:`parse_url` turns a URL into an immutable :class:`TunnelURL` or
:class:`MasterURL`.  Every problem raises :class:`URLError`, whose message
names the offending part or parameter and what is allowed.  Unlike NodePass,
which silently replaces an invalid parameter value by its default, nodepass
refuses it, so a typo never runs a tunnel with settings the user did not ask
for.  Unknown parameters are kept (and shown in ``config``) but have no effect.

Defaults and meanings are NodePass's (see ``docs/configuration.md``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Union
from urllib.parse import quote_plus, unquote

from nodepass.durations import format_duration, parse_duration
from nodepass.net import join_host_port

__all__ = [
    "URLError",
    "HostPort",
    "TunnelURL",
    "MasterURL",
    "parse_url",
    "parse_tunnel_url",
    "parse_master_url",
    "derive_key",
    "PARAMETERS",
    "USAGE_FORMS",
]

LOG_LEVELS: tuple[str, ...] = ("none", "debug", "info", "warn", "error", "event")

#: The three URL forms, as the usage box shows them.
USAGE_FORMS: tuple[str, ...] = (
    "server://password@host/host?<query>",
    "client://password@host/host?<query>",
    "master://hostname:port/path?<query>",
)


class URLError(ValueError):
    """A URL that nodepass cannot run.

    ``param`` names the query parameter (or URL part such as ``"scheme"``,
    ``"tunnel address"``) that is wrong; the message says what is allowed.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --------------------------------------------------------------------------
# addresses

_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class HostPort:
    """A ``host:port`` pair as written in a URL.

    ``host`` is ``""`` for "all interfaces", an IP literal without brackets,
    or a DNS name.  ``port_text`` keeps the port exactly as written (the
    default tunnel key is derived from it).
    """

    host: str
    port: int
    port_text: str = ""

    @property
    def is_ip(self) -> bool:
        """Whether ``host`` is an IP literal."""
        return _ip(self.host) is not None

    @property
    def is_ipv6(self) -> bool:
        """Whether ``host`` is an IPv6 literal."""
        ip = _ip(self.host)
        return ip is not None and ip.version == 6

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _valid_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(_LABEL.match(label) for label in labels)


def parse_host_port(text: str, what: str, *, allow_port_zero: bool = False) -> HostPort:
    """Parse ``host:port`` / ``[v6]:port`` / ``:port``; *what* names it in errors."""
    text = text.strip()
    if not text:
        raise URLError(f"{what} is empty; expected host:port", what)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise URLError(f"{what} {text!r}: missing ']' after the IPv6 address", what)
        host = text[1:end]
        rest = text[end + 1 :]
        if not rest.startswith(":"):
            raise URLError(f"{what} {text!r}: missing port; expected [ipv6]:port", what)
        port_text = rest[1:]
        ip = _ip(host)
        if ip is None or ip.version != 6:
            raise URLError(f"{what} {text!r}: {host!r} is not an IPv6 address", what)
    else:
        if ":" not in text:
            raise URLError(f"{what} {text!r}: missing port; expected host:port", what)
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise URLError(
                f"{what} {text!r}: an IPv6 address must be in brackets, e.g. [::1]:{port_text}", what
            )
        if host and _ip(host) is None and not _valid_hostname(host):
            raise URLError(f"{what} {text!r}: {host!r} is not a valid host name or IP address", what)
    low = 0 if allow_port_zero else 1
    if not port_text.isdigit() or not (low <= int(port_text) <= 65535):
        raise URLError(
            f"{what} {text!r}: port {port_text!r} is not a number from {low} to 65535", what
        )
    return HostPort(host, int(port_text), port_text)


def derive_key(port_text: str) -> str:
    """The default tunnel key: FNV-1a 32-bit of the port text, as 8 lowercase hex digits."""
    value = 0x811C9DC5
    for byte in port_text.encode("ascii"):
        value ^= byte
        value = (value * 0x01000193) & 0xFFFFFFFF
    return f"{value:08x}"


# --------------------------------------------------------------------------
# parameters

Side = Literal["server", "client", "both"]


@dataclass(frozen=True)
class Parameter:
    """One query parameter: its default (as ``config`` prints it), side and allowed values."""

    name: str
    side: Side
    default: str | None  # None: not filled into ``config``
    allowed: str


#: Every parameter, in NodePass's documentation order.
PARAMETERS: tuple[Parameter, ...] = (
    Parameter("log", "both", None, "none, debug, info, warn, error, event"),
    Parameter("tls", "server", None, "0 (plain), 1 (self-signed), 2 (certificate files)"),
    Parameter("crt", "server", None, "a certificate file path (tls=2)"),
    Parameter("key", "server", None, "a private key file path (tls=2)"),
    Parameter("dns", "both", "5m0s", "a duration such as 30s, 5m, 1h (0 disables the cache)"),
    Parameter("sni", "client", "none", "a server name, or none"),
    Parameter("lbs", "both", None, "0 (round-robin), 1 (lowest latency), 2 (primary/backup)"),
    Parameter("min", "client", "64", "an integer from 1 to 65536"),
    Parameter("max", "server", "1024", "an integer from 1 to 65536"),
    Parameter("mode", "both", "0", "0 (auto), 1, 2"),
    Parameter("type", "server", "0", "0 (TCP), 1 (QUIC), 2 (WebSocket), 3 (HTTP/2)"),
    Parameter("dial", "both", "auto", "auto or an IP address"),
    Parameter("read", "both", "0s", "a duration such as 30s, 10m (0 disables)"),
    Parameter("rate", "both", "0", "an integer number of Mbit/s, 0 for unlimited"),
    Parameter("slot", "both", "65536", "an integer from 0 (unlimited) to 1048576"),
    Parameter("proxy", "both", "0", "0 (off), 1 (PROXY protocol v1)"),
    Parameter("block", "both", "0", "0, or digits among 1 (SOCKS), 2 (HTTP), 3 (TLS), e.g. 13"),
    Parameter("notcp", "both", "0", "0, 1"),
    Parameter("noudp", "both", "0", "0, 1"),
    # Not a NodePass parameter (NodePass ignores it): which addresses may open
    # WebSocket pool connections (type=2); see docs/configuration.md.
    Parameter("wsip", "server", None, "auto, same, any"),
)
_PARAM_BY_NAME = {p.name: p for p in PARAMETERS}

_SERVER_DEFAULTS = {"dns", "max", "mode", "type", "dial", "read", "rate", "slot", "proxy", "block", "notcp", "noudp"}
_CLIENT_DEFAULTS = {"dns", "sni", "min", "mode", "dial", "read", "rate", "slot", "proxy", "block", "notcp", "noudp"}


def _bad(name: str, value: str) -> URLError:
    return URLError(
        f"invalid {name}={value!r}: allowed values are {_PARAM_BY_NAME[name].allowed}", name
    )


def _choice(name: str, value: str, choices: Iterable[str]) -> str:
    if value not in tuple(choices):
        raise _bad(name, value)
    return value


def _int(name: str, value: str, low: int, high: int) -> int:
    if not value.isdigit() or not (low <= int(value) <= high):
        raise _bad(name, value)
    return int(value)


def _duration(name: str, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise _bad(name, value) from None
    if seconds < 0:
        raise _bad(name, value)
    return seconds


def _query_pairs(query: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for part in query.split("&"):
        if not part:
            continue
        if ";" in part:
            raise URLError(f"invalid query {part!r}: ';' is not a parameter separator, use '&'", "query")
        name, _, value = part.partition("=")
        pairs.append((unquote(name.replace("+", " ")), unquote(value.replace("+", " "))))
    return pairs


def encode_query(pairs: Iterable[tuple[str, str]]) -> str:
    """Encode pairs as NodePass does: keys sorted, values form-encoded (space as ``+``)."""
    ordered = sorted(pairs, key=lambda kv: kv[0])
    return "&".join(f"{quote_plus(k, safe='')}={quote_plus(v, safe='')}" for k, v in ordered)


# --------------------------------------------------------------------------
# URL objects


@dataclass(frozen=True)
class MasterURL:
    """A parsed ``master://`` URL."""

    listen: HostPort
    prefix: str
    log: str
    tls: int
    crt: str
    key_file: str
    raw: str

    @property
    def base(self) -> str:
        """The route base every API path lives under, e.g. ``/api/v1``."""
        return f"{self.prefix}/v1"

    @property
    def host(self) -> str:
        """The listen host (``""`` for all interfaces)."""
        return self.listen.host

    @property
    def port(self) -> int:
        """The listen port (0 picks a free one)."""
        return self.listen.port


@dataclass(frozen=True)
class TunnelURL:
    """A parsed ``server://`` or ``client://`` URL with every parameter resolved.

    ``query`` keeps the parameters exactly as given (for ``url``/``config``);
    the typed fields hold the effective values with NodePass's defaults.
    """

    scheme: Literal["server", "client"]
    key: str
    key_given: bool
    userinfo: str
    tunnel: HostPort
    targets: tuple[HostPort, ...]
    target_text: str
    log: str
    tls: int
    crt: str
    key_file: str
    dns: float
    sni: str
    lbs: int
    min: int
    max: int
    mode: int
    type: int
    dial: str
    read: float
    rate: int
    slot: int
    proxy: int
    block: frozenset[int]
    notcp: bool
    noudp: bool
    wsip: str
    query: tuple[tuple[str, str], ...]
    extra: tuple[tuple[str, str], ...]
    raw: str

    @property
    def target(self) -> HostPort:
        """The first target address."""
        return self.targets[0]

    @property
    def server_name(self) -> str:
        """The TLS/handshake server name: ``sni``, else the tunnel host if it is a name, else ``none``."""
        return self.sni

    def _base(self) -> str:
        auth = f"{self.userinfo}@" if self.userinfo else ""
        return f"{self.scheme}://{auth}{self.tunnel}/{self.target_text}"

    def _inherited(self, master: MasterURL | None) -> dict[str, str]:
        values: dict[str, str] = {}
        for name, value in self.query:
            values.setdefault(name, value)
        if master is None:
            return values
        if master.log and not values.get("log"):
            values["log"] = master.log
        if self.scheme == "server" and master.tls != 0:
            if not values.get("tls"):
                values["tls"] = str(master.tls)
            if master.tls == 2:
                if master.crt and not values.get("crt"):
                    values["crt"] = master.crt
                if master.key_file and not values.get("key"):
                    values["key"] = master.key_file
        return values

    def with_inheritance(self, master: MasterURL | None = None) -> str:
        """The URL as a master stores it (``url``): log (and, for servers, tls/crt/key)
        inherited from *master* where the URL lacks them, keys sorted."""
        query = encode_query(self._inherited(master).items())
        return self._base() + (f"?{query}" if query else "")

    def canonical(self, master: MasterURL | None = None) -> str:
        """The ``config`` string: :meth:`with_inheritance` plus every default filled in."""
        values = self._inherited(master)
        wanted = _SERVER_DEFAULTS if self.scheme == "server" else _CLIENT_DEFAULTS
        for name in wanted:
            default = _PARAM_BY_NAME[name].default
            if not values.get(name) and default is not None:
                values[name] = default
        if "lbs" in values and not values["lbs"]:
            values["lbs"] = "0"
        for name in ("dns", "read"):
            if values.get(name):
                try:
                    values[name] = format_duration(parse_duration(values[name]))
                except ValueError:
                    pass
        return self._base() + "?" + encode_query(values.items())

    def startup_line(self) -> str:
        """The ``server://...``/``client://...`` text of the ``... started:`` log line."""
        common = (
            f"dial={self.dial}&read={format_duration(self.read)}&rate={self.rate}&slot={self.slot}"
            f"&proxy={self.proxy}&block={''.join(map(str, sorted(self.block))) or '0'}"
            f"&notcp={int(self.notcp)}&noudp={int(self.noudp)}"
        )
        targets = ",".join(str(t) for t in self.targets)
        head = f"{self.scheme}://{self.key}@{self.tunnel}/{targets}"
        if self.scheme == "server":
            return (
                f"{head}?dns={format_duration(self.dns)}&lbs={self.lbs}&max={self.max}&mode={self.mode}"
                f"&type={self.type}&{common}"
            )
        return (
            f"{head}?dns={format_duration(self.dns)}&sni={self.sni}&lbs={self.lbs}&min={self.min}"
            f"&mode={self.mode}&{common}"
        )


ParsedURL = Union[TunnelURL, MasterURL]


def _split(text: str) -> tuple[str, str, str, str]:
    """Split ``scheme://authority/path?query`` (no fragment handling beyond refusing it)."""
    if "://" not in text:
        raise URLError(
            f"invalid URL {text!r}: expected server://, client:// or master:// followed by host:port",
            "scheme",
        )
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme not in ("server", "client", "master"):
        raise URLError(
            f"unknown scheme {scheme!r}: allowed schemes are server, client and master", "scheme"
        )
    if "#" in rest:
        raise URLError(f"invalid URL {text!r}: '#' is not allowed (percent-encode it as %23)", "url")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    return scheme, authority, (slash + path), query


def parse_master_url(text: str) -> MasterURL:
    """Parse a ``master://host:port[/prefix]?log=&tls=&crt=&key=`` URL."""
    if not isinstance(text, str):
        raise URLError("the URL must be a string", "url")
    scheme, authority, path, query = _split(text.strip())
    if scheme != "master":
        raise URLError(f"expected a master:// URL, got {scheme}://", "scheme")
    if "@" in authority:
        raise URLError("a master URL takes no user or key part before '@'", "userinfo")
    listen = parse_host_port(authority, "listen address", allow_port_zero=True)
    prefix = path.rstrip("/") if path not in ("", "/") else "/api"
    if path not in ("", "/") and not prefix:
        prefix = ""
    if any(ch in prefix for ch in " \t\r\n%"):
        raise URLError(f"invalid API prefix {path!r}: spaces and '%' are not allowed", "prefix")
    values: dict[str, str] = {}
    for name, value in _query_pairs(query):
        values.setdefault(name, value)
    log = values.get("log", "")
    if log:
        _choice("log", log, LOG_LEVELS)
    tls_text = values.get("tls", "") or "0"
    tls = int(_choice("tls", tls_text, ("0", "1", "2")))
    if values.get("type") in ("1", "3"):
        tls = max(tls, 1) if tls != 2 else 2
    return MasterURL(
        listen=listen,
        prefix=prefix,
        log=log,
        tls=tls,
        crt=values.get("crt", ""),
        key_file=values.get("key", ""),
        raw=text,
    )


def parse_tunnel_url(text: str) -> TunnelURL:
    """Parse a ``server://`` or ``client://`` URL, validating every parameter."""
    if not isinstance(text, str):
        raise URLError("the URL must be a string", "url")
    text = text.strip()
    scheme, authority, path, query = _split(text)
    if scheme == "master":
        raise URLError("expected a server:// or client:// URL, got master://", "scheme")
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        userinfo, hostport = "", authority
    key = unquote(userinfo.partition(":")[0])
    tunnel = parse_host_port(hostport, "tunnel address")
    key_given = bool(key)
    if not key_given:
        key = derive_key(tunnel.port_text)

    target_text = path[1:] if path.startswith("/") else path
    targets = tuple(
        parse_host_port(item, "target address")
        for item in (part.strip() for part in target_text.split(","))
        if item
    )
    if not targets:
        raise URLError(
            f"missing target address in {text!r}: expected {scheme}://host:port/target_host:target_port",
            "target address",
        )

    pairs = _query_pairs(query)
    values: dict[str, str] = {}
    for name, value in pairs:
        values.setdefault(name, value)

    def get(name: str) -> str:
        return values.get(name, "")

    log = get("log") or "info"
    _choice("log", log, LOG_LEVELS)
    tls = int(_choice("tls", get("tls") or "0", ("0", "1", "2")))
    dns = _duration("dns", get("dns")) if get("dns") else 300.0
    sni_given = get("sni")
    if sni_given:
        if sni_given != "none" and not _valid_hostname(sni_given) and _ip(sni_given) is None:
            raise _bad("sni", sni_given)
        sni = sni_given
    else:
        sni = tunnel.host if tunnel.host and not tunnel.is_ip else "none"
    lbs = int(_choice("lbs", get("lbs") or "0", ("0", "1", "2")))
    min_ = _int("min", get("min"), 1, 65536) if get("min") else 64
    max_ = _int("max", get("max"), 1, 65536) if get("max") else 1024
    mode = int(_choice("mode", get("mode") or "0", ("0", "1", "2")))
    type_ = int(_choice("type", get("type") or "0", ("0", "1", "2", "3")))
    if type_ in (1, 3) and scheme == "server" and tls == 0:
        tls = 1  # QUIC and HTTP/2 pools always run over TLS
    dial = get("dial") or "auto"
    if dial != "auto" and _ip(dial) is None:
        raise _bad("dial", dial)
    read = _duration("read", get("read")) if get("read") else 0.0
    rate = _int("rate", get("rate"), 0, 1_000_000) if get("rate") else 0
    slot = _int("slot", get("slot"), 0, 1_048_576) if get("slot") else 65536
    proxy = int(_choice("proxy", get("proxy") or "0", ("0", "1")))
    block_text = get("block") or "0"
    if not re.fullmatch(r"[0-3]+", block_text):
        raise _bad("block", block_text)
    block = frozenset(int(ch) for ch in block_text if ch != "0")
    notcp = _choice("notcp", get("notcp") or "0", ("0", "1")) == "1"
    noudp = _choice("noudp", get("noudp") or "0", ("0", "1")) == "1"
    if notcp and noudp:
        raise URLError("notcp=1 and noudp=1 together leave nothing to forward", "notcp")

    wsip = _choice("wsip", get("wsip") or "auto", ("auto", "same", "any"))

    _loop_guard(tunnel, targets)

    extra = tuple((k, v) for k, v in pairs if k not in _PARAM_BY_NAME)
    return TunnelURL(
        scheme=scheme,  # type: ignore[arg-type]
        key=key,
        key_given=key_given,
        userinfo=userinfo,
        tunnel=tunnel,
        targets=targets,
        target_text=target_text,
        log=log,
        tls=tls,
        crt=get("crt"),
        key_file=get("key"),
        dns=dns,
        sni=sni,
        lbs=lbs,
        min=min_,
        max=max_,
        mode=mode,
        type=type_,
        dial=dial,
        read=read,
        rate=rate,
        slot=slot,
        proxy=proxy,
        block=block,
        notcp=notcp,
        noudp=noudp,
        wsip=wsip,
        query=tuple(pairs),
        extra=extra,
        raw=text,
    )


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def _is_unspecified(host: str) -> bool:
    if host == "":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_unspecified


def _loop_guard(tunnel: HostPort, targets: tuple[HostPort, ...]) -> None:
    """Refuse a target that would forward the tunnel port back into itself."""
    for target in targets:
        if target.port == tunnel.port and (
            _is_loopback(target.host) or _is_unspecified(tunnel.host)
        ):
            raise URLError(
                f"target {target} would loop back into the tunnel address {tunnel}: "
                "use a different port",
                "target address",
            )


def parse_url(text: str) -> ParsedURL:
    """Parse any NodePass URL; raises :class:`URLError`."""
    if not isinstance(text, str):
        raise URLError("the URL must be a string", "url")
    scheme = text.strip().partition("://")[0].lower()
    if scheme == "master":
        return parse_master_url(text)
    return parse_tunnel_url(text)
