"""The URL grammar: every parameter's default, valid values and each invalid case."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from nodepass.url import (
    PARAMETERS,
    HostPort,
    MasterURL,
    TunnelURL,
    URLError,
    derive_key,
    parse_master_url,
    parse_tunnel_url,
    parse_url,
)

SERVER = "server://:10101/127.0.0.1:8080"
CLIENT = "client://10.0.0.1:10101/127.0.0.1:8080"


def tunnel(text: str) -> TunnelURL:
    result = parse_tunnel_url(text)
    assert isinstance(result, TunnelURL)
    return result


class DefaultsTests(unittest.TestCase):
    def test_server_defaults(self) -> None:
        u = tunnel(SERVER)
        self.assertEqual(
            (u.log, u.tls, u.crt, u.key_file, u.dns, u.lbs, u.max, u.mode, u.type, u.dial, u.read,
             u.rate, u.slot, u.proxy, u.block, u.notcp, u.noudp, u.wsip),
            ("info", 0, "", "", 300.0, 0, 1024, 0, 0, "auto", 0.0, 0, 65536, 0, frozenset(), False, False, "auto"),
        )

    def test_client_defaults(self) -> None:
        u = tunnel(CLIENT)
        self.assertEqual((u.min, u.sni, u.mode), (64, "none", 0))

    def test_sni_defaults_to_host_name(self) -> None:
        self.assertEqual(tunnel("client://tunnel.example.com:443/127.0.0.1:80").sni, "tunnel.example.com")
        self.assertEqual(tunnel("client://[::1]:443/127.0.0.1:80").sni, "none")


# (parameter, value, attribute, expected)
VALID = [
    ("log", "none", "log", "none"),
    ("log", "debug", "log", "debug"),
    ("log", "warn", "log", "warn"),
    ("log", "error", "log", "error"),
    ("log", "event", "log", "event"),
    ("tls", "0", "tls", 0),
    ("tls", "1", "tls", 1),
    ("tls", "2", "tls", 2),
    ("crt", "/etc/a.crt", "crt", "/etc/a.crt"),
    ("key", "/etc/a.key", "key_file", "/etc/a.key"),
    ("dns", "30s", "dns", 30.0),
    ("dns", "1h30m", "dns", 5400.0),
    ("dns", "0", "dns", 0.0),
    ("sni", "example.org", "sni", "example.org"),
    ("lbs", "1", "lbs", 1),
    ("lbs", "2", "lbs", 2),
    ("min", "1", "min", 1),
    ("min", "128", "min", 128),
    ("max", "65536", "max", 65536),
    ("mode", "1", "mode", 1),
    ("mode", "2", "mode", 2),
    ("type", "0", "type", 0),
    ("type", "2", "type", 2),
    ("dial", "127.0.0.1", "dial", "127.0.0.1"),
    ("dial", "::1", "dial", "::1"),
    ("read", "500ms", "read", 0.5),
    ("read", "10m", "read", 600.0),
    ("rate", "100", "rate", 100),
    ("slot", "0", "slot", 0),
    ("slot", "2", "slot", 2),
    ("proxy", "1", "proxy", 1),
    ("block", "0", "block", frozenset()),
    ("block", "1", "block", frozenset({1})),
    ("block", "123", "block", frozenset({1, 2, 3})),
    ("block", "31", "block", frozenset({1, 3})),
    ("notcp", "1", "notcp", True),
    ("noudp", "1", "noudp", True),
    ("wsip", "any", "wsip", "any"),
    ("wsip", "same", "wsip", "same"),
]

# (parameter, bad value, words the message must contain)
INVALID = [
    ("log", "verbose", "none, debug, info, warn, error, event"),
    ("tls", "3", "0 (plain), 1 (self-signed), 2"),
    ("dns", "5", "duration"),
    ("dns", "-1s", "duration"),
    ("dns", "abc", "duration"),
    ("sni", "bad host!", "server name"),
    ("lbs", "3", "round-robin"),
    ("min", "0", "1 to 65536"),
    ("min", "x", "1 to 65536"),
    ("max", "-5", "1 to 65536"),
    ("max", "70000", "1 to 65536"),
    ("mode", "3", "0 (auto), 1, 2"),
    ("type", "4", "0 (TCP)"),
    ("dial", "not-an-ip", "auto or an IP address"),
    ("read", "10", "duration"),
    ("rate", "1.5", "Mbit/s"),
    ("rate", "-1", "Mbit/s"),
    ("slot", "many", "0 (unlimited)"),
    ("proxy", "2", "PROXY protocol v1"),
    ("block", "4", "SOCKS"),
    ("block", "1a", "SOCKS"),
    ("notcp", "yes", "0, 1"),
    ("noudp", "2", "0, 1"),
    ("wsip", "all", "auto, same, any"),
]


class ParameterTableTests(unittest.TestCase):
    def test_valid_values(self) -> None:
        for name, value, attribute, expected in VALID:
            with self.subTest(param=name, value=value):
                u = tunnel(f"{SERVER}?{name}={value}")
                self.assertEqual(getattr(u, attribute), expected)

    def test_invalid_values_name_parameter_and_allowed_values(self) -> None:
        for name, value, words in INVALID:
            with self.subTest(param=name, value=value):
                with self.assertRaises(URLError) as caught:
                    parse_tunnel_url(f"{SERVER}?{name}={value}")
                self.assertEqual(caught.exception.param, name)
                self.assertIn(name, str(caught.exception))
                self.assertIn(words, str(caught.exception))

    def test_every_parameter_is_covered(self) -> None:
        covered = {v[0] for v in VALID} | {"sni"}
        self.assertEqual({p.name for p in PARAMETERS} - covered, set())

    def test_empty_value_means_default(self) -> None:
        self.assertEqual(tunnel(f"{SERVER}?max=&log=").max, 1024)

    def test_stream_pool_types_force_tls(self) -> None:
        self.assertEqual(tunnel(f"{SERVER}?type=1").tls, 1)
        self.assertEqual(tunnel(f"{SERVER}?type=3&tls=2").tls, 2)
        self.assertEqual(tunnel(f"{SERVER}?type=2").tls, 0)

    def test_notcp_and_noudp_together_refused(self) -> None:
        with self.assertRaises(URLError):
            parse_tunnel_url(f"{SERVER}?notcp=1&noudp=1")

    def test_unknown_parameters_kept(self) -> None:
        u = tunnel(f"{SERVER}?foo=bar")
        self.assertEqual(u.extra, (("foo", "bar"),))
        self.assertIn("foo=bar", u.canonical())


class AddressTests(unittest.TestCase):
    def test_key_from_userinfo(self) -> None:
        u = tunnel("server://s3cret@:10101/127.0.0.1:8080")
        self.assertEqual((u.key, u.key_given), ("s3cret", True))

    def test_key_password_part_ignored_and_decoded(self) -> None:
        self.assertEqual(tunnel("server://a%40b:ignored@:10101/127.0.0.1:8080").key, "a@b")

    def test_default_key_is_fnv1a_of_port_text(self) -> None:
        self.assertEqual(derive_key("10101"), "e68be2b4")
        self.assertEqual(derive_key("443"), "2339c1b2")
        self.assertEqual(derive_key("8080"), "40c0f1e5")
        u = tunnel(SERVER)
        self.assertEqual((u.key, u.key_given), ("e68be2b4", False))

    def test_hosts(self) -> None:
        cases = {
            "server://:10101/127.0.0.1:8080": HostPort("", 10101, "10101"),
            "server://0.0.0.0:10101/127.0.0.1:8080": HostPort("0.0.0.0", 10101, "10101"),
            "server://[::]:10101/127.0.0.1:8080": HostPort("::", 10101, "10101"),
            "client://tunnel.example.com:10101/127.0.0.1:8080": HostPort("tunnel.example.com", 10101, "10101"),
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(tunnel(text).tunnel, expected)

    def test_ipv6_rendering(self) -> None:
        u = tunnel("server://[::1]:10101/[2001:db8::1]:443")
        self.assertEqual(str(u.tunnel), "[::1]:10101")
        self.assertEqual(str(u.target), "[2001:db8::1]:443")
        self.assertTrue(u.target.is_ipv6)

    def test_multi_target(self) -> None:
        u = tunnel("server://:10101/10.0.0.1:80, 10.0.0.2:80,,backend.local:8080")
        self.assertEqual([str(t) for t in u.targets], ["10.0.0.1:80", "10.0.0.2:80", "backend.local:8080"])

    def test_bad_addresses(self) -> None:
        cases = [
            ("server://h/127.0.0.1:80", "missing port"),
            ("server://h:0/127.0.0.1:80", "1 to 65535"),
            ("server://h:70000/127.0.0.1:80", "1 to 65535"),
            ("server://::1:80/127.0.0.1:80", "brackets"),
            ("server://[::1/127.0.0.1:80", "missing ']'"),
            ("server://[1.2.3.4]:80/127.0.0.1:80", "not an IPv6"),
            ("server://bad_host!:80/127.0.0.1:80", "not a valid host"),
            ("server://:10101/", "missing target"),
            ("server://:10101", "missing target"),
            ("server://:10101/ , ", "missing target"),
            ("server://:10101/127.0.0.1", "missing port"),
            ("server://:10101/127.0.0.1:10101", "loop back"),
            ("client://127.0.0.1:10101/localhost:10101", "loop back"),
            ("http://h:1/a:2", "unknown scheme"),
            ("h:1/a:2", "expected server://"),
            ("server://h:1/a:2#frag", "'#'"),
        ]
        for text, words in cases:
            with self.subTest(text=text):
                with self.assertRaises(URLError) as caught:
                    parse_url(text)
                self.assertIn(words, str(caught.exception))

    def test_same_port_on_another_host_is_fine(self) -> None:
        self.assertEqual(tunnel("server://1.2.3.4:10101/10.0.0.5:10101").target.port, 10101)


class CanonicalTests(unittest.TestCase):
    def test_client_config_matches_observed_form(self) -> None:
        u = tunnel("client://127.0.0.1:18995/127.0.0.1:18996?log=debug&mode=1&rate=10")
        self.assertEqual(
            u.canonical(),
            "client://127.0.0.1:18995/127.0.0.1:18996?block=0&dial=auto&dns=5m0s&log=debug&min=64"
            "&mode=1&notcp=0&noudp=0&proxy=0&rate=10&read=0s&slot=65536&sni=none",
        )

    def test_server_config_order_and_inheritance(self) -> None:
        master = parse_master_url("master://:9090?log=warn&tls=2&crt=/a/b c&key=/k")
        u = tunnel("server://pw@:10101/127.0.0.1:8080")
        self.assertEqual(
            u.canonical(master),
            "server://pw@:10101/127.0.0.1:8080?block=0&crt=%2Fa%2Fb+c&dial=auto&dns=5m0s&key=%2Fk"
            "&log=warn&max=1024&mode=0&notcp=0&noudp=0&proxy=0&rate=0&read=0s&slot=65536&tls=2&type=0",
        )
        self.assertEqual(
            u.with_inheritance(master), "server://pw@:10101/127.0.0.1:8080?crt=%2Fa%2Fb+c&key=%2Fk&log=warn&tls=2"
        )

    def test_clients_never_inherit_tls(self) -> None:
        master = parse_master_url("master://:9090?tls=1")
        self.assertEqual(tunnel(CLIENT).with_inheritance(master), CLIENT)

    def test_durations_are_go_formatted(self) -> None:
        self.assertIn("dns=1h30m0s", tunnel(f"{SERVER}?dns=90m").canonical())
        self.assertIn("read=500ms", tunnel(f"{SERVER}?read=0.5s").canonical())

    def test_startup_line(self) -> None:
        u = tunnel("server://pw@:10101/127.0.0.1:8080?block=31")
        self.assertEqual(
            u.startup_line(),
            "server://pw@:10101/127.0.0.1:8080?dns=5m0s&lbs=0&max=1024&mode=0&type=0&dial=auto"
            "&read=0s&rate=0&slot=65536&proxy=0&block=13&notcp=0&noudp=0",
        )


class MasterURLTests(unittest.TestCase):
    def test_prefix_normalisation(self) -> None:
        cases = {
            "master://127.0.0.1:9090": "/api/v1",
            "master://127.0.0.1:9090/": "/api/v1",
            "master://127.0.0.1:9090/admin": "/admin/v1",
            "master://127.0.0.1:9090/admin//": "/admin/v1",
            "master://127.0.0.1:9090/api/v1": "/api/v1/v1",
            "master://127.0.0.1:9090//": "/v1",
        }
        for text, base in cases.items():
            with self.subTest(text=text):
                self.assertEqual(parse_master_url(text).base, base)

    def test_fields(self) -> None:
        m = parse_url("master://:0?log=debug&tls=2&crt=/c&key=/k")
        assert isinstance(m, MasterURL)
        self.assertEqual((m.host, m.port, m.log, m.tls, m.crt, m.key_file), ("", 0, "debug", 2, "/c", "/k"))

    def test_errors(self) -> None:
        for text, words in [
            ("master://127.0.0.1", "missing port"),
            ("master://:9090?tls=9", "tls"),
            ("master://:9090?log=loud", "log"),
            ("master://k@:9090", "'@'"),
        ]:
            with self.subTest(text=text):
                with self.assertRaises(URLError) as caught:
                    parse_url(text)
                self.assertIn(words, str(caught.exception))


PARAM_VALUES = st.sampled_from(
    ["", "0", "1", "2", "3", "-1", "5m", "10", "auto", "127.0.0.1", "::1", "debug", "x y", "%zz", "123", "1h2m3s"]
)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80))
    def test_random_strings_raise_only_urlerror(self, text: str) -> None:
        try:
            parse_url(text)
        except URLError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from(["server", "client"]),
        st.dictionaries(st.sampled_from([p.name for p in PARAMETERS] + ["zzz"]), PARAM_VALUES, max_size=8),
    )
    def test_random_parameter_mixes(self, scheme: str, params: dict[str, str]) -> None:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        try:
            u = parse_url(f"{scheme}://k@127.0.0.1:10101/127.0.0.1:8080?{query}")
        except URLError as exc:
            self.assertTrue(exc.param)
            return
        assert isinstance(u, TunnelURL)
        # A URL that parses has a canonical form that parses to the same settings.
        again = parse_tunnel_url(u.canonical())
        self.assertEqual((again.max, again.min, again.slot, again.block, again.dns), (u.max, u.min, u.slot, u.block, u.dns))
