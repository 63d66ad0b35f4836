"""The server's listening sockets, bound before the model loads.

A port that is taken should cost the user a second, not a model load followed by uvicorn's raw errno line:
``clex-serve serve`` binds first and hands the bound sockets to uvicorn, so nothing can take the port in
between either.
"""

from __future__ import annotations

import errno
import socket


def bind_listening_sockets(host: str, port: int) -> list[socket.socket]:
    """One bound socket per address ``host`` resolves to (``localhost`` may be 127.0.0.1 and ::1), set up
    as asyncio's own ``create_server`` would; ``ValueError`` with one line that names the port when the
    address cannot be had."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ValueError(f"cannot listen on host {host!r}: {error.strerror}; check --host") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a TIME_WAIT port
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 address has its own
            try:
                sock.bind(address)
            except OSError as error:
                raise ValueError(_bind_failure(host, port, error)) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_failure(host: str, port: int, error: OSError) -> str:
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if error.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {host} (another server?): stop it or choose another --port"
    if error.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need root): choose another --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: this machine has no such address; check --host"
    return f"cannot listen on {where}: {error.strerror or error}"
