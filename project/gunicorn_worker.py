"""gunicorn's uvicorn worker, handed the plain listening sockets so a stop logs no socket error.

gunicorn wraps each listening socket in its own `BaseSocket`. uvicorn gives those wrappers to the
event loop; uvloop (the loop uvicorn picks when installed) closes the file descriptor itself when
the server stops, then calls the wrapper's `close()`, which fails on the closed descriptor and
logs "Error while closing socket [Errno 9] Bad file descriptor" — once per worker, on every stop.
Given the `socket.socket` inside the wrapper instead, uvloop closes it cleanly.
"""

from __future__ import annotations

import socket
from typing import Any

from uvicorn_worker import UvicornWorker as _UvicornWorker


class UvicornWorker(_UvicornWorker):
    sockets: list[Any]  # gunicorn's listeners (untyped upstream)

    def run(self) -> None:
        self.sockets = [self._plain(listener) for listener in self.sockets]
        super().run()

    @staticmethod
    def _plain(listener: object) -> socket.socket:
        inner = getattr(listener, "sock", listener)  # gunicorn.sock.BaseSocket keeps it in .sock
        assert isinstance(inner, socket.socket), f"unexpected listener {listener!r}"
        return inner
