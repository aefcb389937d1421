"""Kubernetes service-link variables, recognised so that they are not settings.

Unless a pod sets ``enableServiceLinks: false``, Kubernetes gives it variables
for every Service in its namespace, named after the Service: one called
"gateway" or "gateway-<anything>" produces ``GATEWAY_PORT=tcp://10.0.0.1:8080``,
``GATEWAY_ADMIN_SERVICE_HOST=10.0.0.2`` and so on, which would otherwise read
as a bad port or a misspelt setting and crash-loop every pod at its next
start. They are recognised by name AND value, so a genuine typo still fails.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

_SERVICE = r"^(?:[A-Z0-9_]+_)?"  # the Service's name, absent for one called "gateway"
_LINK = r"PORT_\d{1,5}_(?:TCP|UDP|SCTP)"
_LINK_URL = re.compile(r"^(?:tcp|udp|sctp)://(?:\[[0-9A-Fa-f:.]+\]|[0-9.]+):\d{1,5}$")


def _is_link_url(value: str) -> bool:
    return _LINK_URL.match(value) is not None


def _is_protocol(value: str) -> bool:
    return value.upper() in ("TCP", "UDP", "SCTP")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_port(value: str) -> bool:
    return value.isdigit() and 0 < int(value) < 65536


def is_service_link(name: str, value: str) -> bool:
    """Whether ``<prefix><name>=value`` has the shape of a Kubernetes service
    link; ``name`` is the variable's name after the gateway's prefix."""
    upper = name.upper()
    return any(shape.match(upper) and valid(value) for shape, valid in _LINK_SHAPES)


# A name may fit several shapes (SERVICE_PORT is also "<service SERVICE>_PORT"),
# so every shape whose name matches is tried against the value.
_LINK_SHAPES: tuple[tuple[re.Pattern[str], Callable[[str], bool]], ...] = (
    (re.compile(_SERVICE + r"SERVICE_HOST$"), _is_ip),
    (re.compile(_SERVICE + r"SERVICE_PORT(?:_[A-Z0-9_]+)?$"), _is_port),
    (re.compile(_SERVICE + r"PORT$"), _is_link_url),
    (re.compile(_SERVICE + _LINK + r"$"), _is_link_url),
    (re.compile(_SERVICE + _LINK + r"_PROTO$"), _is_protocol),
    (re.compile(_SERVICE + _LINK + r"_PORT$"), _is_port),
    (re.compile(_SERVICE + _LINK + r"_ADDR$"), _is_ip),
)
