"""Entrypoint for one extraction shard in its own interpreter (the GPU venv for vLLM): one engine per process.

    python -m reki_core.llm.extract_shard --config conf/reki.yaml --dt 1998-03-31 --shard 3

Prints the shard's accounting as one JSON line (the last line of stdout); exits non-zero on failure.
`REKI__...` environment overrides apply as for every other step.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one knowledge-extraction shard of a planned date.")
    parser.add_argument("--config", required=True, help="pipeline config file (conf/reki.yaml)")
    parser.add_argument("--dt", required=True, help="partition date YYYY-MM-DD")
    parser.add_argument("--shard", required=True, type=int, help="shard id from the plan")
    args = parser.parse_args(argv)

    from reki_core.config import load_config
    from reki_core.llm.runner import run_shard

    cfg = load_config(args.config)
    result = run_shard(cfg, args.dt, args.shard)
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
