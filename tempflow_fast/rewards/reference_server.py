"""A small reward server: serves any in-process reward over HTTP in the wire format of
server_protocol.py (JSON always; Flow-GRPO's pickle only with `allow_pickle=True`, loopback only).

For tests and local set-ups: a threaded `http.server` on `POST /`; requests are scored one at a time
(one model, one lock), answered with {"scores": [...]}; a bad request gets 400 and a failing reward
500, each with the error text as body, as Flow-GRPO's servers answer.

    with RewardHTTPServer(ShapesReward()) as server:
        client = RewardServerClient(server.url)
"""

from __future__ import annotations

import ipaddress
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from .base import check_batch
from .server_protocol import JSON_CONTENT_TYPE, decode_request, encode_response

_MAX_BODY_BYTES = 1 << 30


class RewardHTTPServer:
    def __init__(self, reward: Callable, host: str = "127.0.0.1", port: int = 0, allow_pickle: bool = False):
        if allow_pickle and not _is_loopback(host):
            raise ValueError("allow_pickle serves only on a loopback host (unpickling runs sender-chosen code), "
                             f"got host {host!r}")
        self.reward = reward
        self.allow_pickle = allow_pickle
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True  # a stuck request must not keep close() waiting
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "RewardHTTPServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="reward-server", daemon=True)
            self._thread.start()
        return self

    def wait(self) -> None:
        """Block until the server stops (close() from another thread, or the process is interrupted)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=0.5)  # short joins keep Ctrl-C responsive

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "RewardHTTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, body: bytes, content_type: str):
        """(status, body, content type) for one request body."""
        try:
            request = decode_request(body, content_type, self.allow_pickle)
            images = request["images"]
            prompts = request.get("prompts")
            prompts = check_batch(images, [""] * images.shape[0] if prompts is None else prompts)
        except Exception as err:  # anything wrong with what the client sent
            return 400, f"bad request: {type(err).__name__}: {err}".encode("utf-8"), "text/plain"
        protocol = "json" if content_type.split(";")[0].strip().lower() == JSON_CONTENT_TYPE else "pickle"
        try:
            with self._lock:
                scores = self.reward(images, prompts)
            payload, ctype = encode_response(protocol, scores.detach().float().cpu().tolist())
        except Exception:
            return 500, traceback.format_exc().encode("utf-8"), "text/plain"
        return 200, payload, ctype

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= _MAX_BODY_BYTES:
                    status, payload, ctype = 400, f"bad request: Content-Length {length}".encode(), "text/plain"
                else:
                    body = self.rfile.read(length)
                    status, payload, ctype = server.score(body, self.headers.get("Content-Type", ""))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format, *args):  # keep test and training output clean
                pass

        return Handler


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
