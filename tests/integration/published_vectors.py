"""Helpers for the publish / vector-store tests: synthetic vectors that follow docs/data_contracts.md
and a config pointing at a fresh bucket of the session's SeaweedFS."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reki_core.config import PROJECT_ROOT, load_config
from reki_core.storage.object_store import make_s3_client


def vectors_parquet(kind: str, ids: list[str], dim: int = 32, seed: int = 0, model_version: str = "m1",
                    groups: dict[str, np.ndarray] | None = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """A vectors file (entity_kind, entity_id, vector: list<float32>, model_version) and the vectors it holds."""
    rng = np.random.default_rng(seed)
    vectors = {i: rng.normal(size=dim).astype(np.float32) for i in ids}
    rows_kind = [kind] * len(ids)
    rows_id = list(ids)
    rows_vec = [vectors[i] for i in ids]
    for group_id, vec in (groups or {}).items():
        rows_kind.append(f"{kind}_group")
        rows_id.append(group_id)
        rows_vec.append(vec.astype(np.float32))
    table = pa.table({
        "entity_kind": pa.array(rows_kind, pa.string()),
        "entity_id": pa.array(rows_id, pa.string()),
        "vector": pa.array([v.tolist() for v in rows_vec], pa.list_(pa.float32())),
        "model_version": pa.array([model_version] * len(rows_id), pa.string()),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue(), vectors


def version_files(seed: int = 0, n_users: int = 20, n_items: int = 30, dim: int = 32, **kwargs):
    users_bytes, users = vectors_parquet("user", [f"u{i}" for i in range(n_users)], dim, seed, **kwargs)
    items_bytes, items = vectors_parquet("item", [f"i{i}" for i in range(n_items)], dim, seed + 1000, **kwargs)
    files = {
        "user_vectors.parquet": users_bytes,
        "item_vectors.parquet": items_bytes,
        "adaptor.pt": f"adaptor weights seed {seed}".encode(),
        "model_card.json": json.dumps({"model_version": "m1", "seed": seed}).encode(),
    }
    return files, users, items


def gate(name: str, success: bool = True) -> dict:
    return {"gate": name, "dataset": name, "rows": 10, "success": success, "evaluated": 3, "failed": [], "warnings": []}


def fresh_bucket_config(tmp_path, seaweed, **env):
    """A config whose object store is a new, empty bucket on the session SeaweedFS."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    make_s3_client(seaweed.endpoint_url, seaweed.writer_key, seaweed.writer_secret).create_bucket(Bucket=bucket)
    environ = {  # as tests/conftest.py make_config, plus the bucket (conftest is not importable as a module)
        "REKI__PATHS__STATE_DIR": str(tmp_path / "state"),
        "REKI__PATHS__LAKE_URI": str(tmp_path / "lake"),
        "REKI__PATHS__DATA_DIR": str(PROJECT_ROOT / ".reki" / "data"),
        "REKI__SCENARIO": "movielens",
        "REKI__OBJECT_STORE__ENDPOINT_URL": seaweed.endpoint_url,
        "REKI__OBJECT_STORE__BUCKET": bucket,
        "REKI__LAKE__TABLES_IN_STORE": "false",  # a scratch lake, as make_config's
        **env,
    }
    return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ=environ)


def writer(seaweed) -> dict:
    return {"access_key": seaweed.writer_key, "secret_key": seaweed.writer_secret}


def reader(seaweed) -> dict:
    return {"access_key": seaweed.reader_key, "secret_key": seaweed.reader_secret}
