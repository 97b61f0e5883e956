"""The first act of the pickup-latency task in every system: send `marker wall-time` over UDP."""

from __future__ import annotations

import socket
import time

_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def send_stamp(port: int, marker: int) -> None:
    _sock.sendto(f"{marker} {time.time():.6f}".encode(), ("127.0.0.1", port))
