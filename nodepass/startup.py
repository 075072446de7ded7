"""What a tunnel process loads at start: TLS libraries only once they are used.

Twisted's reactor imports its TLS support (pyOpenSSL, and through it the
``cryptography`` bindings and their own OpenSSL) when it starts, whether or
not anything in the process uses TLS: about 15-20 MB of resident memory and a
noticeable share of the start-up time.  :func:`defer_tls_libraries`, called
before the reactor is imported, arranges instead that

* ``twisted.protocols.tls`` and ``twisted.internet.ssl`` are loaded when
  something first uses them (``TLSMemoryBIOFactory``, ``listenSSL``,
  ``connectSSL``, TLS endpoints all keep working, a little later), and so is
  ``http.cookiejar`` (which Twisted imports only to re-export it);
* ``twisted.internet._newtls`` is not loaded: it only provides ``startTLS``
  on a plain TCP connection, which nothing in this project calls; the TCP
  transports then use Twisted's plain (non-TLS) mixins.

The pool's own TLS (:mod:`nodepass.relay.tls`) runs on the standard
library's ``ssl`` module, so a ``tls=0`` tunnel never loads pyOpenSSL, and a
``tls=1`` one loads ``cryptography`` only to make its certificate.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["defer_tls_libraries", "defer_modules", "LAZY_MODULES"]

#: Modules loaded on first use instead of at reactor start (the last one is
#: only a compatibility alias of Twisted's, which brings the HTTP client and
#: e-mail packages along).
LAZY_MODULES = ("twisted.protocols.tls", "twisted.internet.ssl", "http.cookiejar")
#: Twisted's startTLS support, left out.
UNUSED_MODULE = "twisted.internet._newtls"


def defer_tls_libraries() -> bool:
    """Arrange the lazy loading described in the module docstring.

    Call it before Twisted is imported; modules already loaded are left as
    they are.  Returns False (leaving ``startTLS`` support in place) once
    Twisted's TCP support is loaded, since its transports are built then."""
    defer_modules()
    if "twisted.internet.tcp" in sys.modules:
        return False
    sys.modules.setdefault(UNUSED_MODULE, None)  # type: ignore[arg-type]
    return True


def defer_modules() -> None:
    """Make each of :data:`LAZY_MODULES` not yet imported load on first use."""
    for name in LAZY_MODULES:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        loader = importlib.util.LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        # ``from package import name`` then finds it without touching it
        # (any look-up on the module itself would load it).
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
