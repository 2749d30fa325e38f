"""A fake HTTP server on loopback for the tests and probes of clients that must survive bad servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextmanager
def fake_api(body: bytes, content_type: str = "application/json", trickle: float = 0.0) -> Iterator[str]:
    """An HTTP server on loopback answering every request with ``body``; its /api URL.

    With ``trickle``, it sends the whole answer one byte per ``trickle`` seconds (for 3 s
    at most, then hangs up): a server too slow to finish, yet never silent long enough
    for a per-read timeout.
    """
    answer = (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n"
              f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    class Answer(BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not trickle:
                self.wfile.write(answer)
                return
            stop = time.monotonic() + 3
            try:
                for byte in answer:
                    if time.monotonic() > stop:
                        break
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(trickle)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting, as a client with a deadline should
            self.close_connection = True

        do_GET = do_POST = answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()
