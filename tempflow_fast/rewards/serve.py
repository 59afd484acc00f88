"""Serve a reward over HTTP from the command line, e.g. a reward model on its own GPU or machine:

    python -m tempflow_fast.rewards.serve --config reward.yaml --port 18085
    python -m tempflow_fast.rewards.serve --set name=pickscore --set path=/models/PickScore_v1 --port 18086

The `reward:` section format (RewardConfig) picks the reward; the trainer then uses
`reward: {name: server, url: "http://<host>:<port>/"}`. JSON requests only, unless --allow-pickle
(Flow-GRPO's clients; loopback hosts only). Prints one line `serving <name> on <url>` once listening.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from tempflow_fast.config import load_config

from .config import RewardConfig, build_reward
from .reference_server import RewardHTTPServer


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tempflow_fast.rewards.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file holding a RewardConfig (the training config's reward: section)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a RewardConfig field")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=18085, help="port; 0 = any free port (default: 18085)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also accept Flow-GRPO's pickled requests (loopback only)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(RewardConfig, args.config, args.set)
        server = RewardHTTPServer(build_reward(cfg), host=args.host, port=args.port, allow_pickle=args.allow_pickle)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving {getattr(server.reward, 'name', cfg.name)} on {server.url}", flush=True)
    server.start()
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
