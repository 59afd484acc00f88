"""Reward-server client against the reference server on 127.0.0.1 (ephemeral ports): round trips in
both wire formats, and the failures — a server that sleeps past the timeout, one that answers
malformed JSON, one that errors — end in clear RuntimeErrors within bounded time."""

import base64
import io
import json
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from tempflow_fast.rewards import RewardConfig, RewardHTTPServer, RewardServerClient, build_reward
from tempflow_fast.rewards.server_protocol import decode_scores, encode_images, safe_loads
from tempflow_fast.tasks.shapes.detector import ShapesReward
from tempflow_fast.tasks.shapes.grammar import TRAIN_PROMPTS
from tempflow_fast.tasks.shapes.render import render


class ContrastReward:
    """A continuous, prompt-dependent toy reward: per-image pixel std scaled by the prompt's length."""

    name = "contrast"

    def __call__(self, images, prompts):
        return images.flatten(1).std(1) * torch.tensor([len(p) for p in prompts], dtype=torch.float32) / 10


def _shapes_batch(n=12):
    prompts = [TRAIN_PROMPTS[i * 7 % len(TRAIN_PROMPTS)] for i in range(n)]
    images = render(prompts, np.random.default_rng(0))
    prompts = prompts[: n // 2] + prompts[n // 2 + 1:] + prompts[n // 2: n // 2 + 1]  # mismatch some pairs
    return images, prompts


@pytest.mark.parametrize("protocol, image_format", [("json", "png"), ("pickle", "png"), ("json", "jpeg")])
def test_round_trip_equals_in_process(protocol, image_format):
    reward = ShapesReward()
    images, prompts = _shapes_batch()
    local = reward(images, prompts)
    assert 0 < local.sum() < len(prompts)  # both outcomes present, so equality means something
    with RewardHTTPServer(ShapesReward(), allow_pickle=True) as server:
        client = RewardServerClient(server.url, protocol=protocol, image_format=image_format, timeout_s=10,
                                    retries=0, batch_size=5)
        remote = client(images, prompts)
    assert remote.dtype == torch.float32 and remote.shape == local.shape
    assert torch.equal(remote, local)


def test_continuous_scores_survive_the_trip_exactly():
    images = (torch.rand(7, 3, 16, 20, generator=torch.Generator().manual_seed(1)) * 255).round() / 255
    prompts = [f"prompt number {i}" * (i + 1) for i in range(7)]
    with RewardHTTPServer(ContrastReward()) as server:
        cfg = RewardConfig(name="server", url=server.url, image_format="png", timeout_s=10, retries=0, batch_size=3)
        remote = build_reward(cfg)(images, prompts)
    torch.testing.assert_close(remote, ContrastReward()(images, prompts), rtol=0, atol=1e-6)


def test_uint8_images_score_as_their_float_twins():
    images = (torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 255).round() / 255
    with RewardHTTPServer(ContrastReward()) as server:
        client = RewardServerClient(server.url, image_format="png", timeout_s=10, retries=0)
        assert client.accepts_uint8
        as_float = client(images, ["a", "bb", "ccc"])
        as_uint8 = client((images * 255).round().to(torch.uint8), ["a", "bb", "ccc"])
    assert torch.equal(as_float, as_uint8) and as_float.min() > 0


def test_geneval_metadata_is_sent(tmp_path):
    seen = {}

    class Recorder:
        name = "recorder"

        def __call__(self, images, prompts):
            return torch.zeros(images.shape[0])

    lines = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
             {"tag": "two_object", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"}]
    meta = tmp_path / "geneval.jsonl"
    meta.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with RewardHTTPServer(Recorder()) as server:
        original = server.score

        def spy(body, ctype):
            seen.update(json.loads(body))
            return original(body, ctype)

        server.score = spy
        client = build_reward(RewardConfig(name="server", url=server.url, metadata_path=str(meta), timeout_s=10,
                                           retries=0, only_strict=False))
        client(torch.rand(2, 3, 8, 8), ["a photo of two dogs", "a photo of a cat"])
        with pytest.raises(ValueError, match="no GenEval metadata for 'a photo of a bird'"):
            client(torch.rand(1, 3, 8, 8), ["a photo of a bird"])
    assert seen["meta_datas"] == [lines[1], lines[0]] and seen["only_strict"] is False
    assert seen["prompts"] == ["a photo of two dogs", "a photo of a cat"] and seen["image_format"] == "jpeg"


class _Stub:
    """A loopback HTTP server answering every POST with `handler(request_handler, stub)`; the request
    body is in `request_handler._body`."""

    def __init__(self, handler):
        stub = self
        self.calls = 0
        self.release = threading.Event()

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                stub.calls += 1
                self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                handler(self, stub)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(handler, status, body: bytes, ctype="application/json"):
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_timeout_bounds_the_whole_call_retries_included():
    def sleepy(handler, stub):
        stub.release.wait(30)  # far past the client's timeout; released when the test ends

    with _Stub(sleepy) as stub:
        client = RewardServerClient(stub.url, timeout_s=0.5, retries=2, backoff_s=0.05)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as info:
            client(torch.rand(2, 3, 8, 8), ["a", "b"])
        elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert stub.url in msg and "failed after 1 attempt " in msg and "timeout_s=0.5 for the whole call" in msg
    assert stub.calls == 1  # the deadline passed during the first attempt: no time left for retries
    assert 0.5 <= elapsed < 2.0


def test_retries_run_inside_the_deadline():
    def flaky(handler, stub):
        if stub.calls < 3:
            _reply(handler, 503, b"warming up", "text/plain")
        else:
            _reply(handler, 200, b'{"scores": [0.25]}')

    with _Stub(flaky) as stub:
        scores = RewardServerClient(stub.url, timeout_s=5, retries=3, backoff_s=0.05)(torch.rand(1, 3, 8, 8), ["a"])
        assert scores.tolist() == [0.25] and stub.calls == 3
    with _Stub(lambda h, s: _reply(h, 503, b"overloaded", "text/plain")) as stub:
        client = RewardServerClient(stub.url, timeout_s=0.5, retries=10, backoff_s=0.2)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"failed after 2 attempts.*HTTP 503: overloaded; no time left"):
            client(torch.rand(1, 3, 8, 8), ["a"])
        assert time.monotonic() - t0 < 0.5 and stub.calls == 2  # 0.2 s pause, then 0.4 s would pass the deadline


def test_malformed_json_is_a_clear_error_without_retries():
    with _Stub(lambda h, s: _reply(h, 200, b'{"scores": [0.5, ')) as stub:
        client = RewardServerClient(stub.url, timeout_s=5, retries=3, backoff_s=0.05)
        with pytest.raises(RuntimeError, match=r"malformed response: response is not valid json") as info:
            client(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert stub.url in str(info.value) and stub.calls == 1


@pytest.mark.parametrize("body, match", [
    (b'{"scores": [0.5]}', r"must be a list of 2 numbers, got 1"),
    (b'{"rewards": [0.5, 1.0]}', r"none of the keys \['scores', 'outputs'\]"),
    (b'{"scores": [0.5, "high"]}', r"non-number: 'high'"),
    (b'[0.5, 1.0]', r"must be an object/dict, got list"),
])
def test_wrong_shaped_answers_are_clear_errors(body, match):
    with _Stub(lambda h, s: _reply(h, 200, body)) as stub:
        with pytest.raises(RuntimeError, match=match):
            RewardServerClient(stub.url, timeout_s=5, retries=0)(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_server_errors_are_retried_then_reported():
    with _Stub(lambda h, s: _reply(h, 500, b"Traceback: CUDA out of memory", "text/plain")) as stub:
        with pytest.raises(RuntimeError, match=r"(?s)failed after 2 attempts.*HTTP 500: Traceback: CUDA out of memory"):
            RewardServerClient(stub.url, timeout_s=5, retries=1, backoff_s=0.01)(torch.rand(1, 3, 8, 8), ["a"])
        assert stub.calls == 2
    with _Stub(lambda h, s: _reply(h, 404, b"no such route", "text/plain")) as stub:
        with pytest.raises(RuntimeError, match=r"refused the request \(HTTP 404: no such route\)"):
            RewardServerClient(stub.url, timeout_s=5, retries=3)(torch.rand(1, 3, 8, 8), ["a"])
        assert stub.calls == 1


def test_nobody_listening_fails_after_retries():
    with RewardHTTPServer(ContrastReward()) as server:
        url = server.url  # the port is free again once the server is closed
    with pytest.raises(RuntimeError, match=r"failed after 2 attempts.*(Connection refused|Errno)"):
        RewardServerClient(url, timeout_s=2, retries=1, backoff_s=0.01)(torch.rand(1, 3, 8, 8), ["a"])


def test_reference_server_answers_bad_requests_with_400_and_reward_errors_with_500():
    class Broken:
        name = "broken"

        def __call__(self, images, prompts):
            raise RuntimeError("model exploded")

    with RewardHTTPServer(Broken()) as server:
        status, body, _ = server.score(b"not json", "application/json")
        assert status == 400 and b"bad request" in body
        status, body, _ = server.score(pickle.dumps({"images": []}), "")
        assert status == 400 and b"pickle is off" in body
        status, body, _ = server.score(json.dumps({"images": []}).encode(), "application/json")
        assert status == 400 and b"at least one image" in body
        one = base64.b64encode(encode_images(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "png")[0]).decode()
        request = json.dumps({"images": [one], "prompts": ["a", "b"]}).encode()
        status, body, _ = server.score(request, "application/json")
        assert status == 400 and b"prompts has 2 entries but images has 1 rows" in body
        with pytest.raises(RuntimeError, match=r"(?s)HTTP 500.*model exploded"):
            RewardServerClient(server.url, timeout_s=5, retries=0)(torch.rand(1, 3, 8, 8), ["a"])
    with pytest.raises(ValueError, match="loopback"):
        RewardHTTPServer(ContrastReward(), host="0.0.0.0", allow_pickle=True)


def test_pickle_responses_are_unpickled_safely():
    as_array = pickle.dumps({"outputs": np.array([0.25, 1.0], dtype=np.float32)})
    assert decode_scores(as_array, "pickle", 2, None) == [0.25, 1.0]
    assert decode_scores(pickle.dumps({"scores": [np.float64(0.5), True]}), "pickle", 2, None) == [0.5, 1.0]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.print"):
        safe_loads(pickle.dumps({"scores": [Evil()]}))


def test_client_arguments_are_checked():
    with pytest.raises(ValueError, match="url must start with http"):
        RewardServerClient("localhost:8000")
    with pytest.raises(ValueError, match="protocol must be one of"):
        RewardServerClient("http://127.0.0.1:1/", protocol="grpc")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        RewardServerClient("http://127.0.0.1:1/", timeout_s=0)


def test_unifiedreward_chat_protocol(monkeypatch):
    from PIL import Image

    from tempflow_fast.rewards.unified_reward import parse_final_score

    seen = []

    def chat(handler, stub):
        body = json.loads(handler._body)
        content = body["messages"][0]["content"]
        url = content[0]["image_url"]["url"]
        assert url.startswith("data:image;base64,")
        size = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size
        text = content[1]["text"]
        seen.append((body["model"], body["temperature"], size, handler.headers.get("Authorization")))
        answer = "I cannot tell." if "unscorable" in text else f"Looks fine. Final Score: {text.count('square') + 2}"
        _reply(handler, 200, json.dumps({"choices": [{"message": {"content": answer}}]}).encode())

    monkeypatch.setenv("TEST_UR_KEY", "sekrit")
    with _Stub(chat) as stub:
        reward = build_reward(RewardConfig(name="unifiedreward", url=stub.url + "v1", image_size=24, timeout_s=10,
                                           retries=0, batch_size=3, api_key_env="TEST_UR_KEY"))
        prompts = ["a red square", "two blue squares and a square", "unscorable", "a circle"]
        scores = reward(torch.rand(4, 3, 16, 16), prompts)
    torch.testing.assert_close(scores, torch.tensor([3 / 5, 4 / 5, 0.0, 2 / 5]))
    assert reward.last_unparsed == 1
    assert all(s == ("UnifiedReward-7b-v1.5", 0, (24, 24), "Bearer sekrit") for s in seen) and len(seen) == 4
    assert parse_final_score("Final Score: 4.5 overall") == 4.5 and parse_final_score("Final Score: 7") is None


def test_unifiedreward_malformed_completion_is_a_clear_error():
    from tempflow_fast.rewards.unified_reward import UnifiedRewardClient

    with _Stub(lambda h, s: _reply(h, 200, b'{"choices": []}')) as stub:
        with pytest.raises(RuntimeError, match=r"malformed chat completion \(IndexError"):
            UnifiedRewardClient(stub.url + "v1", timeout_s=5, retries=0)(torch.rand(1, 3, 8, 8), ["a"])
    with pytest.raises(ValueError, match="api_key_env"):
        UnifiedRewardClient("http://127.0.0.1:1/v1", api_key_env="TEMPFLOW_SURELY_UNSET_VARIABLE")


def test_serve_command_serves_a_configured_reward(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "tempflow_fast.rewards.serve", "--set", "name=shapes", "--port", "0"]
    with open(tmp_path / "stderr.txt", "w") as errors:  # a file, not a pipe: nobody drains it while serving
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        line = proc.stdout.readline()  # EOF (""), if the command dies first
        assert line.startswith("serving shapes_detector on http://127.0.0.1:"), (tmp_path / "stderr.txt").read_text()
        images, prompts = _shapes_batch(6)
        client = RewardServerClient(line.split(" on ")[1].strip(), image_format="png", timeout_s=30, retries=0)
        assert torch.equal(client(images, prompts), ShapesReward()(images, prompts))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_command_reports_config_errors(capsys):
    from tempflow_fast.rewards.serve import main

    assert main(["--set", "name=server", "--port", "0"]) == 2
    assert "url is required for the 'server' reward" in capsys.readouterr().err


def test_serve_reward_factory_errors_are_one_line(tmp_path, capsys):
    from tempflow_fast.rewards.serve import load_reward_factory, main

    (tmp_path / "needs_missing.py").write_text("import surely_not_an_installed_module\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    cases = [
        (["--reward", "brightness"], "--reward must be FILE.py:NAME or module:NAME"),
        (["--reward", str(tmp_path / "nope.py") + ":R"], "no such file"),
        (["--reward", str(tmp_path / "empty.py") + ":Reward"], "has no callable 'Reward'"),
        (["--reward", str(tmp_path / "needs_missing.py") + ":R"],
         "ModuleNotFoundError: No module named 'surely_not_an_installed_module'"),
        (["--reward", "x.py:R", "--set", "name=shapes"], "leave out --config and --set"),
    ]
    for argv, message in cases:
        assert main(argv + ["--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    reward = load_reward_factory("tempflow_fast.rewards.jpeg:jpeg_compressibility")()
    assert reward.name == "jpeg_compressibility"
