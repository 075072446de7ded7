"""The byte-moving layer, below both the pools (:mod:`nodepass.pool`) and the
tunnel logic (:mod:`nodepass.tunnel`): listener -> relay <- pool.

* :mod:`nodepass.relay.endpoint` - :class:`RelayProtocol`, what drives every
  connection that may be joined;
* :mod:`nodepass.relay.join` - :func:`join`, the two-way pipe with
  back-pressure, counters, rate limiting, idle timeout and half-close;
* :mod:`nodepass.relay.write` - direct writes and socket options.
"""

from nodepass.relay.endpoint import DEFAULT_BUFFER_LIMIT, RelayProtocol
from nodepass.relay.join import ThrottleLike, join
from nodepass.relay.write import TurnWriter, direct_writer, is_plain_tcp, set_keepalive, set_nodelay, write_at_once

__all__ = [
    "DEFAULT_BUFFER_LIMIT",
    "RelayProtocol",
    "ThrottleLike",
    "join",
    "TurnWriter",
    "direct_writer",
    "is_plain_tcp",
    "set_keepalive",
    "set_nodelay",
    "write_at_once",
]
