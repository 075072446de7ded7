"""nodepass: a universal TCP/UDP tunnel with a connection pool, TLS and a management API.

``__version__`` is the NodePass level this package implements (URL grammar,
wire protocol and master API of NodePass 1.14).
"""

__version__ = "1.14.0"
