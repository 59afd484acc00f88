"""The reward-server client against servers that misbehave on purpose (loopback, ephemeral ports): one
deadline per call whatever the server does, bounded answers, no redirects, no NaN/Inf or absurd scores,
and the start-up reachability check (`check_reward_reachable`)."""

import json
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from tempflow_fast.rewards import RewardConfig, RewardHTTPServer, RewardServerClient, build_reward
from tempflow_fast.rewards.config import check_reward_reachable

IMAGES, PROMPTS = torch.rand(2, 3, 8, 8), ["a", "b"]


class Zero:
    name = "zero"

    def __call__(self, images, prompts):
        return torch.zeros(images.shape[0])


class RawServer:
    """Loopback TCP server; each connection reads the request head and hands the socket to `talk`."""

    def __init__(self, talk):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.stop = threading.Event()
        self.connections = 0

        def accept():
            while not self.stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.connections += 1
                threading.Thread(target=self._serve, args=(conn, talk), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def _serve(self, conn, talk):
        with conn:
            conn.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    return
                head += chunk
            try:
                talk(conn, self.stop)
            except OSError:
                pass  # the client hung up: that is what these tests provoke

    def close(self):
        self.stop.set()
        self.sock.close()


def trickle(data: bytes, every_s: float, start_with: bytes = b""):
    def talk(conn, stop):
        conn.sendall(start_with)
        for byte in data:
            if stop.wait(every_s):
                return
            conn.sendall(bytes([byte]))
    return talk


class Stub:
    """Loopback http.server answering GET and POST with `answer(handler) -> (status, body, headers)`."""

    def __init__(self, answer):
        stub = self
        self.calls = 0

        class H(BaseHTTPRequestHandler):
            def _any(self):
                stub.calls += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body, headers = answer(self)
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def closing():
    servers = []
    yield servers.append
    for s in servers:
        s.close()


def test_a_server_trickling_a_byte_a_second_fails_the_call_within_the_deadline(closing):
    """The issue's case: timeout_s=5, retries=0 against one byte per second → fails in ~5 s, not minutes."""
    answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{"scores": [0, 0]}  '
    server = RawServer(trickle(answer, every_s=1.0))
    closing(server)
    client = build_reward(RewardConfig(name="server", url=server.url, timeout_s=5, retries=0))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        client(IMAGES, PROMPTS)
    elapsed = time.monotonic() - t0
    assert 4.5 < elapsed < 10, elapsed
    assert server.url in str(info.value) and "no complete answer within timeout_s=5 s" in str(info.value)


def test_a_trickled_body_after_prompt_headers_is_cut_at_the_deadline_too(closing):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    server = RawServer(trickle(b" " * 200, every_s=0.1, start_with=head))
    closing(server)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="no complete answer within timeout_s=1 s"):
        RewardServerClient(server.url, timeout_s=1, retries=3, backoff_s=0.05)(IMAGES, PROMPTS)
    assert time.monotonic() - t0 < 3 and server.connections == 1  # the deadline covers the retries


def test_an_answer_without_length_cut_by_the_deadline_is_a_timeout_not_a_short_answer(closing):
    head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"  # ends when the connection does
    server = RawServer(trickle(b'{"scores": [0, 0]}' + b" " * 50, every_s=0.05, start_with=head))
    closing(server)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="no complete answer within timeout_s=0.5 s"):
        RewardServerClient(server.url, timeout_s=0.5, retries=0)(IMAGES, PROMPTS)
    assert time.monotonic() - t0 < 1.5


def test_an_oversized_answer_is_refused_unread(closing):
    huge = RawServer(trickle(b"", 0, start_with=b"HTTP/1.1 200 OK\r\nContent-Length: 400000000\r\n\r\n{"))
    closing(huge)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"oversized answer: Content-Length 400000000 bytes, the limit is 16777216"):
        RewardServerClient(huge.url, timeout_s=10, retries=3)(IMAGES, PROMPTS)
    assert time.monotonic() - t0 < 2 and huge.connections == 1  # not retried

    def endless(conn, stop):  # no Content-Length: the limit is enforced while reading
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        while not stop.is_set():
            conn.sendall(b"x" * 4096)

    streaming = RawServer(endless)
    closing(streaming)
    with pytest.raises(RuntimeError, match=r"oversized answer: more than 10000 bytes"):
        RewardServerClient(streaming.url, timeout_s=10, retries=0, max_response_bytes=10_000)(IMAGES, PROMPTS)


def test_redirects_are_not_followed(closing):
    target = Stub(lambda h: (200, b'{"scores": [1, 1]}', {}))
    closing(target)
    redirect = Stub(lambda h: (302, b"moved", {"Location": target.url}))
    closing(redirect)
    with pytest.raises(RuntimeError, match=r"redirect \(HTTP 302: moved, Location: http://127\.0\.0\.1:\d+/\); "
                                           r"redirects are not followed"):
        RewardServerClient(redirect.url, timeout_s=5, retries=3)(IMAGES, PROMPTS)
    assert target.calls == 0 and redirect.calls == 1


@pytest.mark.parametrize("scores", [[0.5, float("nan")], [float("inf"), 0.5], [1e38, 0.5], [0.5, -2e6]])
def test_non_finite_and_absurd_scores_are_refused_naming_the_server(closing, scores):
    body = json.dumps({"scores": scores}).encode()  # Python writes NaN / Infinity literals, as a sloppy server would
    stub = Stub(lambda h: (200, body, {"Content-Type": "application/json"}))
    closing(stub)
    with pytest.raises(RuntimeError, match=r"must be finite and within ±1e\+06") as info:
        RewardServerClient(stub.url, timeout_s=5, retries=3)(IMAGES, PROMPTS)
    assert stub.url in str(info.value) and stub.calls == 1


def test_the_score_bound_is_configurable_and_applies_to_pickle_answers(closing):
    stub = Stub(lambda h: (200, pickle.dumps({"outputs": np.array([9.5, 11.0])}), {}))
    closing(stub)
    cfg = dict(name="server", url=stub.url, protocol="pickle", timeout_s=5, retries=0)
    with pytest.raises(RuntimeError, match=r"'outputs'\[1\] is 11\.0; scores must be finite and within ±10"):
        build_reward(RewardConfig(max_abs_score=10, **cfg))(IMAGES, PROMPTS)
    assert build_reward(RewardConfig(max_abs_score=20, **cfg))(IMAGES, PROMPTS).tolist() == [9.5, 11.0]
    with pytest.raises(ValueError, match="max_abs_score must be a finite number > 0"):
        RewardConfig(name="server", url=stub.url, max_abs_score=float("nan")).validate()


def test_reachability_check_fails_fast_naming_the_field():
    with RewardHTTPServer(Zero()) as server:
        url = server.url  # free again once closed: nobody listens there
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^reward\.url: no reward server reachable at http://127\.0\.0\.1:\d+/ "
                                         r"\(ConnectionRefusedError"):
        check_reward_reachable(RewardConfig(name="server", url=url, timeout_s=120))
    composite = RewardConfig(name="composite", components=[RewardConfig(name="shapes"),
                                                           RewardConfig(name="server", url=url)])
    with pytest.raises(ValueError, match=r"^reward\.components\[1\]\.url: no reward server reachable"):
        check_reward_reachable(composite)
    assert time.monotonic() - t0 < 2


def test_reachability_check_bounds_a_silent_server(closing):
    silent = RawServer(lambda conn, stop: stop.wait(30))
    closing(silent)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^reward\.url: reward server .* did not answer within 0\.5 s"):
        check_reward_reachable(RewardConfig(name="server", url=silent.url, timeout_s=0.5))
    assert time.monotonic() - t0 < 2


def test_reachability_check_accepts_servers_that_answer_and_checks_the_token(closing, monkeypatch):
    check_reward_reachable(RewardConfig(name="jpeg_compressibility"))  # nothing to reach
    flask_like = Stub(lambda h: (405, b"Method Not Allowed", {}))  # Flow-GRPO's POST-only route
    closing(flask_like)
    check_reward_reachable(RewardConfig(name="server", url=flask_like.url))
    with RewardHTTPServer(Zero(), token="s3cret") as server:
        with pytest.raises(ValueError, match=r"^reward\.url: reward server .* refused our token \(HTTP 401.*"
                                             r"no token was sent"):
            check_reward_reachable(RewardConfig(name="server", url=server.url))
        with pytest.raises(ValueError, match=r"^reward\.api_key_env: environment variable 'TEST_RS_TOKEN' is not set"):
            check_reward_reachable(RewardConfig(name="server", url=server.url, api_key_env="TEST_RS_TOKEN"))
        monkeypatch.setenv("TEST_RS_TOKEN", "wrong")
        with pytest.raises(ValueError, match="is not the one it expects"):
            check_reward_reachable(RewardConfig(name="server", url=server.url, api_key_env="TEST_RS_TOKEN"))
        monkeypatch.setenv("TEST_RS_TOKEN", "s3cret")
        cfg = RewardConfig(name="server", url=server.url, api_key_env="TEST_RS_TOKEN", timeout_s=5, retries=0)
        check_reward_reachable(cfg)
        client = build_reward(cfg)
        client.check_health()
        assert client(IMAGES, PROMPTS).tolist() == [0.0, 0.0]
    failing = Stub(lambda h: (503, b"model not loaded", {}))
    closing(failing)
    with pytest.raises(ValueError, match=r"is failing \(HTTP 503: model not loaded\)"):
        check_reward_reachable(RewardConfig(name="server", url=failing.url))


def test_a_refused_token_is_not_retried():
    with RewardHTTPServer(Zero(), token="s3cret") as server:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"refused the request \(HTTP 401: unauthorized"):
            RewardServerClient(server.url, timeout_s=5, retries=3, backoff_s=1, token="nope")(IMAGES, PROMPTS)
        assert time.monotonic() - t0 < 1
