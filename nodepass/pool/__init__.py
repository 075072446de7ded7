"""Connection pools for dual-end tunnels.

Only type 0 (TCP, :mod:`nodepass.pool.tcp`) is implemented; see that module
for the wire sequence and the adaptive refill rules.
"""

from nodepass.pool.tcp import CONTROL_ID, ClientPool, PoolConnection, PoolError, ServerPool

__all__ = ["CONTROL_ID", "ClientPool", "PoolConnection", "PoolError", "ServerPool"]
