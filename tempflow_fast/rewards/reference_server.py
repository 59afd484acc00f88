"""A small reward server: serves any in-process reward over HTTP in the wire format of
server_protocol.py (JSON always; Flow-GRPO's pickle only with `allow_pickle=True`, loopback only).

A threaded `http.server` on `POST /` (scoring) and `GET /` (health: 200 {"status": "ok", "reward": name});
requests are scored one at a time (one model, one lock) and answered with {"scores": [...]}. What a
client gets when something is wrong:

  401  a token is set (`token`, serve's --token or $TEMPFLOW_FAST_REWARD_TOKEN) and the request lacks
       `Authorization: Bearer <token>`; checked before the body is read
  400  a malformed request: a bad request line, header line or Content-Length, not JSON, not images,
       prompts of the wrong count
  411  no Content-Length (chunked uploads are not accepted)
  413  over a limit: `max_request_bytes` (checked before reading), `max_images`, or `max_pixels` in one
       image (checked from the image headers, before decoding)
  500  the reward raised: the body names the error; the traceback goes to the server's log only

A client has `request_timeout_s` from connecting to deliver its whole request (headers and body), and
each socket read or write waits at most as long; the connection is dropped after that. Scoring time is
not limited: that is the model's. Serving on a non-loopback address without a token logs a warning.

    with RewardHTTPServer(ShapesReward()) as server:
        client = RewardServerClient(server.url)
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from .base import check_batch
from .server_protocol import JSON_CONTENT_TYPE, RequestTooLarge, decode_request, encode_response

logger = logging.getLogger("tempflow_fast.rewards.server")

TOKEN_ENV = "TEMPFLOW_FAST_REWARD_TOKEN"  # where serve looks for the token when --token is not given
DEFAULT_MAX_REQUEST_BYTES = 256 << 20  # 64 PNGs at 1024² in base64 take ~180 MB; JPEGs far less
DEFAULT_MAX_IMAGES = 64  # Flow-GRPO's clients send at most 64 images a request
DEFAULT_MAX_PIXELS = 2048 * 1024  # per image: 1024², Qwen-Image's 1328² and 2048x1024 fit; a full request
# of 64 such images decodes to ~1.6 GB of floats, so no request can cost much more than a legitimate one
DEFAULT_REQUEST_TIMEOUT_S = 60.0


class RewardHTTPServer:
    """Binds `host:port` at construction (ValueError with a one-line reason when it cannot, e.g. the
    port is in use). `reward` may be None until start(): serve binds the port before loading a model."""

    def __init__(self, reward: Optional[Callable], host: str = "127.0.0.1", port: int = 0,
                 allow_pickle: bool = False, token: Optional[str] = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_images: int = DEFAULT_MAX_IMAGES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S):
        if allow_pickle and not _is_loopback(host):
            raise ValueError("allow_pickle serves only on a loopback host (unpickling runs sender-chosen code), "
                             f"got host {host!r}")
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise ValueError(f"port must be 0..65535 (0 = any free port), got {port!r}")
        if token is not None and not token.strip():
            raise ValueError("token must be a non-empty string (or None for no authentication)")
        if min(max_request_bytes, max_images, max_pixels) < 1 or not request_timeout_s > 0:
            raise ValueError(f"limits must be positive, got max_request_bytes={max_request_bytes}, "
                             f"max_images={max_images}, max_pixels={max_pixels}, request_timeout_s={request_timeout_s}")
        self.reward = reward
        self.allow_pickle, self.token = allow_pickle, token
        self.max_request_bytes, self.max_images, self.max_pixels = max_request_bytes, max_images, max_pixels
        self.request_timeout_s = float(request_timeout_s)
        self._lock = threading.Lock()
        try:
            self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use (another reward server?); "
                                 f"pick another --port, or 0 for any free one") from None
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
        self._httpd.daemon_threads = True  # a stuck request must not keep close() waiting
        self._thread: Optional[threading.Thread] = None
        if token is None and not _is_loopback(host):
            logger.warning("reward server on %s without a token: anyone who can reach this address can use it; "
                           "set --token or $%s (clients: reward.api_key_env)", self.url, TOKEN_ENV)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> "RewardHTTPServer":
        if self.reward is None:
            raise ValueError("no reward to serve: set server.reward before start()")
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
            request = decode_request(body, content_type, self.allow_pickle, self.max_images, self.max_pixels)
            images = request["images"]
            prompts = request.get("prompts")
            prompts = check_batch(images, [""] * images.shape[0] if prompts is None else prompts)
        except RequestTooLarge as err:
            return 413, f"request too large: {err}".encode("utf-8"), "text/plain"
        except Exception as err:  # anything wrong with what the client sent
            return 400, f"bad request: {type(err).__name__}: {err}".encode("utf-8"), "text/plain"
        protocol = "json" if content_type.split(";")[0].strip().lower() == JSON_CONTENT_TYPE else "pickle"
        try:
            with self._lock:
                scores = self.reward(images, prompts)
            payload, ctype = encode_response(protocol, scores.detach().float().cpu().tolist())
        except Exception as err:
            logger.exception("reward %s failed on %d images", getattr(self.reward, "name", "?"), images.shape[0])
            message = str(err).splitlines()[0][:300] if str(err) else ""
            return 500, f"reward failed: {type(err).__name__}: {message} (traceback in the server log)".encode(
                "utf-8"), "text/plain"
        return 200, payload, ctype

    def _authorized(self, header: Optional[str]) -> bool:
        if self.token is None:
            return True
        return hmac.compare_digest((header or "").encode("utf-8"), f"Bearer {self.token}".encode("utf-8"))

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = server.request_timeout_s  # each socket read/write (StreamRequestHandler applies it)
            error_content_type = "text/plain"  # http.server's own errors (bad request line, header lines)
            error_message_format = "%(code)d %(message)s: %(explain)s\n"

            def setup(self):
                super().setup()
                # socket timeouts bound each read, not a request trickled a byte at a time: drop the
                # connection when the whole request has not arrived in time
                self._watchdog = threading.Timer(server.request_timeout_s, self._drop)
                self._watchdog.daemon = True
                self._watchdog.start()

            def _drop(self):
                logger.warning("dropping %s: no complete request within %g s", self.client_address[0],
                               server.request_timeout_s)
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def finish(self):
                self._watchdog.cancel()
                super().finish()

            def parse_request(self):
                if not super().parse_request():  # answered 400/414/431 itself
                    return False
                if self.headers.defects:  # e.g. a header line without a colon
                    self.send_error(400, "Bad Request", "malformed header lines")
                    return False
                if len(set(self.headers.get_all("Content-Length", []))) > 1:
                    self.send_error(400, "Bad Request", "conflicting Content-Length headers")
                    return False
                return True

            def do_GET(self):
                self._watchdog.cancel()
                if not server._authorized(self.headers.get("Authorization")):
                    return self._unauthorized()
                body = json.dumps({"status": "ok", "reward": getattr(server.reward, "name", None)}).encode()
                self._answer(200, body, JSON_CONTENT_TYPE)

            def do_POST(self):
                if not server._authorized(self.headers.get("Authorization")):
                    return self._unauthorized()
                if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length") is None:
                    return self._answer(411, b"length required: send the body with a Content-Length header")
                raw = self.headers["Content-Length"].strip()
                if not raw.isdigit():
                    return self._answer(400, f"bad request: Content-Length {raw!r} is not a byte count".encode())
                length = int(raw)
                if length == 0:
                    return self._answer(400, b"bad request: empty body")
                if length > server.max_request_bytes:
                    return self._answer(413, f"request too large: {length} bytes, the server's limit is "
                                             f"{server.max_request_bytes} bytes".encode())
                body = self.rfile.read(length)
                self._watchdog.cancel()
                if len(body) < length:  # dropped by the watchdog, or the client gave up
                    self.close_connection = True
                    return None
                self._answer(*server.score(body, self.headers.get("Content-Type", "")))

            def _unauthorized(self):
                self._answer(401, b"unauthorized: this server needs 'Authorization: Bearer <token>' "
                                  b"(client: reward.api_key_env names the variable holding it)",
                             extra={"WWW-Authenticate": "Bearer"})

            def _answer(self, status: int, payload: bytes, ctype: str = "text/plain", extra: Optional[dict] = None):
                self._watchdog.cancel()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format, *args):  # the access log, off unless asked for
                logger.debug("%s %s", self.client_address[0], format % args)

            def log_error(self, format, *args):  # malformed requests, timeouts
                logger.info("%s %s", self.client_address[0], format % args)

        return Handler


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
