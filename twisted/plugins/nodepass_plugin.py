"""twistd plugin: ``twistd nodepass --master|--server|--client URL``."""

from twisted.application.service import ServiceMaker

nodepass = ServiceMaker(
    "nodepass",
    "nodepass.tap",
    "NodePass: TCP/UDP tunnel server, client and management API",
    "nodepass",
)
