"""Network address rules shared by the server and the machine agent."""

from __future__ import annotations

import ipaddress

LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` (also as ``[::1]``) and ``localhost`` and its aliases count as
    loopback; anything else (including ``0.0.0.0`` and other host names) does not."""
    h = host.strip().strip("[]")
    if h.lower() in LOCALHOST_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
