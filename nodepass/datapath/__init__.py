"""Data-path parameters of a tunnel: ``rate``, ``slot``, ``read``, ``proxy``,
``block``, ``notcp``/``noudp``, ``dial``, ``dns`` and ``lbs`` (multi-target).

The tunnel core builds one :class:`DataPolicy` per tunnel instance with
:meth:`DataPolicy.from_config` and calls its hooks on the data path; see
:mod:`nodepass.datapath.policy` for which hook belongs where.
"""

from nodepass.datapath.dial import DialAddressError, SourceAddress, parse_dial
from nodepass.datapath.policy import DataPolicy
from nodepass.datapath.proxyproto import ProxyHeaderError, build_v1_header
from nodepass.datapath.ratelimit import (
    BYTES_PER_MBIT,
    Throttle,
    TokenBucket,
    rate_to_bytes,
)
from nodepass.datapath.resolve import DNSCache
from nodepass.datapath.slots import SlotLimiter
from nodepass.datapath.sniff import SNIFF_BYTES, FirstBytesGate, detect, parse_block
from nodepass.datapath.targets import AllTargetsFailed, TargetDialer, TargetSelector

__all__ = [
    "BYTES_PER_MBIT",
    "SNIFF_BYTES",
    "AllTargetsFailed",
    "DNSCache",
    "DataPolicy",
    "DialAddressError",
    "FirstBytesGate",
    "ProxyHeaderError",
    "SlotLimiter",
    "SourceAddress",
    "TargetDialer",
    "TargetSelector",
    "Throttle",
    "TokenBucket",
    "build_v1_header",
    "detect",
    "parse_block",
    "parse_dial",
    "rate_to_bytes",
]
