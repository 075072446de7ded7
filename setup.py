"""nodepass: a universal TCP/UDP tunnel with a connection pool, TLS and a management API."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "nodepass" / "__init__.py").read_text()).group(1)

setup(
    name="nodepass",
    version=VERSION,
    description="Universal TCP/UDP tunnel with a connection pool, TLS and a REST + SSE management API",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.11",
    packages=find_packages(include=["nodepass", "nodepass.*"]) + ["twisted.plugins"],
    package_data={
        "nodepass": ["py.typed"],
        "twisted": ["plugins/nodepass_plugin.py"],
    },
    install_requires=[
        "twisted[tls]>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "pyOpenSSL>=24.0",
        "service-identity>=24.1",
        "cryptography>=42",
        "zope.interface>=6.0",
        "psutil>=5.9",
        "swagger-ui-py>=25.7",
        "prometheus-client>=0.20",
        # QUIC pool (type=1), imported only when that type is used; nodepass.pool.quic
        # uses a few of its private attributes, hence the narrow range.
        "aioquic>=1.7.2,<1.8",
        # WebSocket pool (type=2): unusual upgrade heads, imported only when one arrives.
        "h11>=0.14",
        # HTTP/2 pool (type=3), imported only when that type is used; its DATA
        # fast path reads h2's flow-control windows and stream states, hence the cap.
        "h2>=4.1,<5",
    ],
    extras_require={
        "test": [
            "hypothesis>=6.100",
            "schemathesis>=4.32,<5",
            "openapi-spec-validator>=0.7",
            # Independent WebSocket implementation the pool's frames are checked against.
            "wsproto>=1.2",
        ],
        "lint": ["mypy>=1.10", "mypy-zope>=1.0", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["nodepass = nodepass.cli:entry"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: Proxy Servers",
        "Topic :: System :: Networking",
    ],
)
