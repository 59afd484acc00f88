"""Serve a reward over HTTP from the command line, e.g. a reward model on its own GPU or machine:

    python -m tempflow_fast.rewards.serve --config reward.yaml --port 18085
    python -m tempflow_fast.rewards.serve --set name=pickscore --set path=/models/PickScore_v1 --port 18086
    TEMPFLOW_FAST_REWARD_TOKEN=<secret> python -m tempflow_fast.rewards.serve --host 0.0.0.0 --set name=shapes
    python -m tempflow_fast.rewards.serve --reward my_ocr.py:OcrReward --port 18087   # your own reward

The `reward:` section format (RewardConfig) picks the reward, or --reward names a factory of your own
(docs/rewards.md has OCR and DeQA examples); the trainer then uses
`reward: {name: server, url: "http://<host>:<port>/"}` (plus `api_key_env: TEMPFLOW_FAST_REWARD_TOKEN` when
the server has a token). JSON requests only, unless --allow-pickle (Flow-GRPO's clients; loopback hosts
only). The port is taken before the reward model loads, so a port in use fails at once (exit 2). Prints
one line `serving <name> on <url>` once listening; errors and warnings go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Callable, List, Optional

from tempflow_fast.config import load_config

from .config import RewardConfig, build_reward
from .reference_server import (DEFAULT_MAX_IMAGES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_REQUEST_BYTES,
                               DEFAULT_REQUEST_TIMEOUT_S, TOKEN_ENV, RewardHTTPServer)


def load_reward_factory(spec: str) -> Callable:
    """'path/to/file.py:NAME' or 'package.module:NAME' → the object NAME there (called with no arguments
    to build the reward). ValueError saying what is missing."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"--reward must be FILE.py:NAME or module:NAME, got {spec!r}")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise ValueError(f"--reward: no such file {where!r}")
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as err:  # the reward's own dependencies, most often
        raise ValueError(f"--reward {spec}: {type(err).__name__}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"--reward: {where} has no callable {name!r}")
    return factory


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tempflow_fast.rewards.serve",
        description=textwrap.fill(
            "Serve a reward over HTTP from the command line, e.g. a reward model on its own GPU or machine. A "
            "training run scores with it through reward: {name: server, url: http://HOST:PORT/} (docs/rewards.md). "
            "Prints one line 'serving NAME on URL' once listening.", 100),
        epilog="examples:\n" + "\n".join(line for line in __doc__.splitlines()
                                          if line.startswith("    ") and "rewards.serve" in line),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file holding a RewardConfig (the training config's reward: section)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a RewardConfig field")
    parser.add_argument("--reward", metavar="FILE.py:NAME",
                        help="serve your own reward instead: NAME() in that file (or module:NAME) returns a "
                             "callable(images, prompts) -> (B,) scores with a .name")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=18085, help="port; 0 = any free port (default: 18085)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also accept Flow-GRPO's pickled requests (loopback only)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_ENV}; "
                             "prefer the variable, a command line is visible to other users)")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2 ** 20,
                        help="larger request bodies get 413 (MiB, default: %(default)g)")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                        help="more images in one request get 413 (default: %(default)d)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="an image with more pixels (width x height) gets 413 (default: %(default)d)")
    parser.add_argument("--request-timeout-s", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="seconds a client has to deliver a whole request (default: %(default)g)")
    args = parser.parse_args(argv)
    try:
        if args.reward and (args.config or args.set):
            raise ValueError("--reward serves your own reward: leave out --config and --set")
        cfg = load_config(RewardConfig, args.config, args.set)
        if not args.reward:
            cfg.validate()
        server = RewardHTTPServer(None, host=args.host, port=args.port, allow_pickle=args.allow_pickle,
                                  token=args.token, max_request_bytes=int(args.max_request_mb * 2 ** 20),
                                  max_images=args.max_images, max_pixels=args.max_pixels,
                                  request_timeout_s=args.request_timeout_s)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        server.reward = load_reward_factory(args.reward)() if args.reward else build_reward(cfg)
    except ValueError as err:
        server.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving {getattr(server.reward, 'name', args.reward or cfg.name)} on {server.url}", flush=True)
    server.start()
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    sys.exit(main())
