"""The knowledge store (`knowledge/store/`): append-only parquet shards of LLM answers keyed by prompt hash.

Each finished shard is one parquet file with at least `prompt_hash, model_id, sampling_version`
(see docs/data_contracts.md). Files whose name starts with `_` or `.` are in progress and ignored.
"""

from __future__ import annotations

import hashlib
import json

from reki_core.config import Config
from reki_core.storage.lake import Lake

STORE_DATASET = "knowledge/store"


def sampling_version(cfg: Config) -> str:
    """A short id of everything that changes an answer for the same prompt and model: backend and sampling."""
    payload = {"backend": cfg.llm.backend, **cfg.llm.sampling.model_dump()}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"s-{digest[:12]}"


def store_files(lake: Lake) -> list[str]:
    """Finished shard files of the knowledge store, sorted (empty when the store does not exist yet)."""
    base = lake.dataset_path(STORE_DATASET)
    if not lake.fs.exists(base):
        return []
    files = []
    for path in lake.fs.find(base):
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith(("_", ".")):
            files.append(path)
    return sorted(files)


def known_prompt_hashes(lake: Lake, model_id: str, sampling_version: str) -> set[str]:
    """Prompt hashes that already have an answer from `model_id` under `sampling_version`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    known: set[str] = set()
    for path in store_files(lake):
        try:
            with lake.fs.open(path, "rb") as fh:
                table = pq.read_table(fh, columns=["prompt_hash", "model_id", "sampling_version"])
        except (KeyError, ValueError) as exc:  # pyarrow names the missing column; add the file
            raise ValueError(f"knowledge store shard {lake.uri_of(path)}: {exc}") from exc
        mask = pc.and_(pc.equal(table["model_id"], model_id), pc.equal(table["sampling_version"], sampling_version))
        known.update(table.filter(mask)["prompt_hash"].to_pylist())
    return known
