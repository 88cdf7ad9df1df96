"""The network addresses of `[osc]`: which listen addresses count as loopback, and `send_to` ("host:port"). Pure;
the config check and daemon/io/osc.py (main thread, at start) call it.

Binding anything but a loopback address exposes improvd's controls (panic, mute, reload...) to every machine that
can reach that address: OSC has no authentication. It is allowed only with `osc.allow_network = true`.
"""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether `host` (an IP literal or "localhost") is a loopback address."""
    if host.strip().lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def parse_host_port(text: str, what: str = "osc.send_to") -> tuple[str, int]:
    """"host:port" (an IPv6 literal in brackets: "[::1]:9001") -> (host, port).

    Raises:
        ValueError: naming the value and the valid form.
    """
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{what} = {text!r} is not valid: expected \"host:port\", e.g. \"127.0.0.1:9001\" "
                         f"(port 1..65535), or \"\" for none")
    return host, int(port)


def check_osc(section) -> None:
    """Check an `OscConfig`: the listen address (loopback unless allow_network) and send_to."""
    listen = section.listen.strip()
    if not listen:
        raise ValueError("osc.listen = '' is not valid: expected an IP address such as \"127.0.0.1\"")
    if not is_loopback(listen):
        try:
            ipaddress.ip_address(listen)
        except ValueError:
            raise ValueError(f"osc.listen = {section.listen!r} is not valid: expected an IP address (e.g. "
                             f"\"127.0.0.1\", or \"0.0.0.0\" for every interface) or \"localhost\"") from None
        if not section.allow_network:
            raise ValueError(f"osc.listen = {section.listen!r} is not a loopback address: other machines could "
                             f"then control improvd (OSC has no authentication). Set osc.allow_network = true to "
                             f"choose this, or listen on \"127.0.0.1\"")
    if section.send_to:
        parse_host_port(section.send_to)
