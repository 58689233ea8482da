"""The one grammar of a host as the API reads it: a ``Host`` header, an ``Origin``'s host, the
host of a machine's URL, ``--allowed-host``."""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?))"
                   r"(?::(?P<port>[0-9]{1,5}))?$")


class HostPort(NamedTuple):
    name: str  # lower case; an IPv6 address without brackets, in its compressed form
    port: int | None


def parse_host(text: str | None) -> HostPort | None:
    """``name[:port]`` or ``[v6][:port]``; ``None`` for anything else (user info, paths, spaces,
    a port outside 1-65535)."""
    m = _HOST.fullmatch(text or "")
    if m is None:
        return None
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 0 < port < 65536:
        return None
    if m["v6"]:
        try:
            return HostPort(str(ipaddress.IPv6Address(m["v6"])), port)
        except ValueError:
            return None
    return HostPort(m["name"].lower(), port)


def is_unspecified(name: str) -> bool:
    """``0.0.0.0`` or ``::``: listening on every address, so not a name anyone is sent to."""
    try:
        return ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False
