"""The reference reward server against hostile or broken clients (loopback, ephemeral ports): size
limits answered 413 before the memory is spent, a deadline per connection, bearer tokens, 400 for
malformed headers, 500 bodies without tracebacks, and the serve command's start-up errors."""

import base64
import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch
from PIL import Image

from tempflow_fast.rewards import RewardConfig, RewardHTTPServer, RewardServerClient, build_reward
from tempflow_fast.rewards.server_protocol import encode_images

IMAGES, PROMPTS = torch.rand(2, 3, 8, 8), ["a", "b"]


class Count:
    """Scores each image by its index; remembers how many images it saw."""

    name = "count"

    def __init__(self):
        self.seen = 0

    def __call__(self, images, prompts):
        self.seen += images.shape[0]
        return torch.arange(images.shape[0], dtype=torch.float32)


def port_of(server):
    return int(server.url.rstrip("/").rsplit(":", 1)[1])


def raw_exchange(port, data: bytes, timeout=10.0) -> bytes:
    """Send `data` on a fresh connection, return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        out = b""
        while chunk := conn.recv(1 << 16):
            out += chunk
    return out


def json_request(files, prompts=None) -> bytes:
    body = {"images": [base64.b64encode(f).decode() for f in files], "image_format": "png"}
    if prompts is not None:
        body["prompts"] = prompts
    return json.dumps(body).encode()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG of 1×1 pixels whose header claims width×height: what a decompression bomb
    looks like to anything that trusts the header."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_a_request_over_the_byte_limit_gets_413_before_its_body_is_read():
    reward = Count()
    with RewardHTTPServer(reward, max_request_bytes=10_000) as server:
        with pytest.raises(RuntimeError, match=r"HTTP 413: request too large: \d+ bytes, the server's limit is 10000"):
            RewardServerClient(server.url, image_format="png", timeout_s=5, retries=3)(torch.rand(2, 3, 64, 64),
                                                                                       PROMPTS)
        head = raw_exchange(port_of(server), b"POST / HTTP/1.1\r\nContent-Type: application/json\r\n"
                                             b"Content-Length: 5000000000\r\n\r\n{")
        assert head.startswith(b"HTTP/1.0 413") and head.endswith(b"the server's limit is 10000 bytes")
    assert reward.seen == 0


def test_too_many_images_get_413_naming_the_limit_and_the_client_setting():
    reward = Count()
    with RewardHTTPServer(reward, max_images=4) as server:
        with pytest.raises(RuntimeError, match=r"HTTP 413: request too large: 5 images in one request, the "
                                               r"server's limit is 4; send smaller batches \(reward\.batch_size\)"):
            RewardServerClient(server.url, timeout_s=5, retries=0, batch_size=5)(torch.rand(5, 3, 8, 8), ["p"] * 5)
        scores = RewardServerClient(server.url, timeout_s=5, retries=0, batch_size=4)(torch.rand(5, 3, 8, 8),
                                                                                       ["p"] * 5)
    assert scores.tolist() == [0, 1, 2, 3, 0] and reward.seen == 5


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding():
    bomb = png_claiming(9000, 9000)  # 81 M pixels (243 MB as RGB, 972 MB as floats) in ~70 bytes
    assert len(bomb) < 200 and Image.open(io.BytesIO(bomb)).size == (9000, 9000)
    reward = Count()
    with RewardHTTPServer(reward, max_pixels=1024 * 1024) as server:
        t0 = time.monotonic()
        status, body, _ = server.score(json_request([bomb] * 64), "application/json")
        assert status == 413 and time.monotonic() - t0 < 1
        assert body == b"request too large: image 0 is 9000x9000 = 81000000 pixels, the server's limit is " \
                       b"1048576 pixels per image"
        ok = encode_images(torch.zeros(1, 3, 1024, 1024, dtype=torch.uint8), "png")[0]
        status, _, _ = server.score(json_request([ok, bomb], ["a", "b"]), "application/json")
        assert status == 413  # a bomb after a good image: refused before the good one is decoded
        status, body, _ = server.score(json_request([png_claiming(50_000, 50_000)]), "application/json")
        assert status == 413 and b"image 0: Image size (2500000000 pixels) exceeds limit" in body  # PIL's own guard
        status, body, _ = server.score(json_request([ok]), "application/json")
        assert status == 200 and json.loads(body) == {"scores": [0.0]}
    assert reward.seen == 1
    with RewardHTTPServer(reward) as server:  # the defaults refuse the case: ~1.5 MB claiming gigabytes
        request = json_request([png_claiming(4096, 4096)] * 64)
        status, body, _ = server.score(request, "application/json")
        assert status == 413 and b"the server's limit is 2097152 pixels per image" in body and len(request) < 20_000


def test_a_client_trickling_its_request_is_dropped_at_the_connection_deadline():
    with RewardHTTPServer(Count(), request_timeout_s=0.5) as server:
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
            t0, dropped = time.monotonic(), False
            while time.monotonic() - t0 < 5:  # one body byte every 0.1 s: each read is quick, the whole is not
                try:
                    conn.sendall(b" ")
                except OSError:
                    dropped = True
                    break
                conn.settimeout(0.1)
                try:
                    if conn.recv(1) == b"":
                        dropped = True
                        break
                except socket.timeout:
                    pass
            assert dropped and time.monotonic() - t0 < 2
        # a client that connects and says nothing is dropped too (slowloris on the headers)
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\n")
            t0 = time.monotonic()
            assert conn.recv(1) == b"" and time.monotonic() - t0 < 2
        assert RewardServerClient(server.url, timeout_s=5, retries=0)(IMAGES, PROMPTS).tolist() == [0, 1]


def test_bearer_token_is_required_when_set():
    with RewardHTTPServer(Count(), token="s3cret") as server:
        port = port_of(server)
        for auth in (b"", b"Authorization: Bearer wrong\r\n", b"Authorization: s3cret\r\n"):
            answer = raw_exchange(port, b"GET / HTTP/1.1\r\n" + auth + b"\r\n")
            assert answer.startswith(b"HTTP/1.0 401") and b"WWW-Authenticate: Bearer" in answer
        answer = raw_exchange(port, b"GET / HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b'{"status": "ok", "reward": "count"}')
        with pytest.raises(RuntimeError, match=r"HTTP 401: unauthorized: this server needs 'Authorization: Bearer"):
            RewardServerClient(server.url, timeout_s=5, retries=0)(IMAGES, PROMPTS)
        client = RewardServerClient(server.url, timeout_s=5, retries=0, token="s3cret")
        assert client(IMAGES, PROMPTS).tolist() == [0, 1]
    with pytest.raises(ValueError, match="token must be a non-empty string"):
        RewardHTTPServer(Count(), token=" ")


def test_a_warning_when_serving_beyond_loopback_without_a_token(caplog):
    caplog.set_level(logging.WARNING, logger="tempflow_fast.rewards.server")
    RewardHTTPServer(Count(), host="127.0.0.1").close()
    RewardHTTPServer(Count(), host="0.0.0.0", token="s3cret").close()
    assert not caplog.records
    RewardHTTPServer(Count(), host="0.0.0.0").close()
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "without a token" in record.getMessage()
    assert "TEMPFLOW_FAST_REWARD_TOKEN" in record.getMessage()


@pytest.mark.parametrize("request_head, status, text", [
    (b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, b"Content-Length 'abc' is not a byte count"),
    (b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, b"Content-Length '-5' is not a byte count"),
    (b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400, b"empty body"),
    (b"POST / HTTP/1.1\r\nno colon in this header line\r\nContent-Length: 2\r\n\r\n{}", 400, b"malformed header lines"),
    (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}", 400, b"conflicting Content-Length"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, b"length required"),
    (b"POST / HTTP/1.1\r\n\r\n", 411, b"length required"),
    (b"POST / HTTP/1.1\r\n" + b"X-Filler: y\r\n" * 150 + b"\r\n", 431, b"Too many headers"),
])
def test_malformed_headers_get_4xx_with_a_message(request_head, status, text):
    reward = Count()
    with RewardHTTPServer(reward) as server:
        answer = raw_exchange(port_of(server), request_head)
    assert answer.startswith(b"HTTP/1.0 %d" % status), answer[:200]
    assert text in answer.split(b"\r\n\r\n", 1)[1] and b"Traceback" not in answer
    assert reward.seen == 0


def test_a_failing_reward_answers_500_without_a_traceback_and_logs_it(caplog):
    class Broken:
        name = "broken"

        def __call__(self, images, prompts):
            raise RuntimeError("CUDA out of memory in /secret/path/model.py\nsecond line")

    caplog.set_level(logging.ERROR, logger="tempflow_fast.rewards.server")
    with RewardHTTPServer(Broken()) as server:
        status, body, _ = server.score(json_request(encode_images(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "png")),
                                       "application/json")
    assert status == 500
    assert body == b"reward failed: RuntimeError: CUDA out of memory in /secret/path/model.py " \
                   b"(traceback in the server log)"
    (record,) = caplog.records
    assert record.exc_info is not None and "reward broken failed on 1 images" in record.getMessage()
    assert "Traceback" in caplog.text and "second line" in caplog.text


def test_a_port_in_use_is_one_line_and_exit_2_before_the_model_loads(capsys):
    from tempflow_fast.rewards.serve import main

    with RewardHTTPServer(Count()) as taken:
        port = port_of(taken)
        with pytest.raises(ValueError, match=rf"^port {port} on 127\.0\.0\.1 is in use"):
            RewardHTTPServer(Count(), port=port)
        with pytest.raises(ValueError, match=r"^port must be 0\.\.65535 \(0 = any free port\), got 70000"):
            RewardHTTPServer(Count(), port=70000)
        # a pickscore path that does not exist would fail when loading: the port is checked first
        assert main(["--set", "name=pickscore", "--set", "path=/nonexistent/PickScore", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: port {port} on 127.0.0.1 is in use (another reward server?); pick another --port, " \
                  f"or 0 for any free one\n"


CUSTOM_REWARD = """
import torch


class Brightness:
    name = "brightness"

    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3)) * 10
"""


def test_serve_runs_your_own_reward_with_the_token_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "brightness.py").write_text(CUSTOM_REWARD)
    env = {**os.environ, "TEMPFLOW_FAST_REWARD_TOKEN": "env-s3cret"}
    command = [sys.executable, "-m", "tempflow_fast.rewards.serve", "--reward",
               f"{tmp_path / 'brightness.py'}:Brightness", "--port", "0"]
    with open(tmp_path / "stderr.txt", "w") as errors:  # a file, not a pipe: nobody drains it while serving
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving brightness on http://127.0.0.1:"), (tmp_path / "stderr.txt").read_text()
        url = line.split(" on ")[1].strip()
        with pytest.raises(RuntimeError, match="HTTP 401"):
            RewardServerClient(url, timeout_s=30, retries=0)(IMAGES, PROMPTS)
        monkeypatch.setenv("TEST_CLIENT_TOKEN", "env-s3cret")
        client = build_reward(RewardConfig(name="server", url=url, api_key_env="TEST_CLIENT_TOKEN", timeout_s=30,
                                           retries=0, image_format="png"))
        expected = (IMAGES * 255).round().mean(dim=(1, 2, 3)) / 255 * 10  # what survives the uint8 PNG trip
        torch.testing.assert_close(client(IMAGES, PROMPTS), expected)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
