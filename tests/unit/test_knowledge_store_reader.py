"""`known_prompt_hashes`: which prompt hashes already have an answer for a model and sampling version."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from reki_core.llm.store import known_prompt_hashes, sampling_version


def _write_shard(lake, name, rows):
    path = Path(lake.root) / "knowledge/store" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["prompt_hash", "model_id", "sampling_version", "text"]).to_parquet(path)


def test_filters_by_model_and_sampling_and_ignores_unfinished_shards(lake):
    assert known_prompt_hashes(lake, "m", "s1") == set()  # no store yet
    _write_shard(lake, "shard-a.parquet", [("h1", "m", "s1", "x"), ("h2", "other", "s1", "x")])
    _write_shard(lake, "model_id=m/sampling_version=s1/shard-b.parquet", [("h3", "m", "s1", "x")])
    _write_shard(lake, "model_id=m/sampling_version=s2/shard-c.parquet", [("h4", "m", "s2", "x")])
    _write_shard(lake, "_inprogress.parquet", [("h5", "m", "s1", "x")])
    assert known_prompt_hashes(lake, "m", "s1") == {"h1", "h3"}
    assert known_prompt_hashes(lake, "m", "s2") == {"h4"}


def test_other_models_folders_are_not_read(lake):
    """The store grows with every model tried: a model's lookups open only its own folder (and the top)."""
    _write_shard(lake, "model_id=m/sampling_version=s1/shard.parquet", [("h1", "m", "s1", "x")])
    other = Path(lake.root) / "knowledge/store/model_id=old/sampling_version=s1/broken.parquet"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"not parquet: opening it would fail")
    assert known_prompt_hashes(lake, "m", "s1") == {"h1"}
    with pytest.raises(Exception):
        known_prompt_hashes(lake, "old", "s1")  # the broken file is that model's own


def test_shard_without_required_column_names_the_file(lake):
    path = Path(lake.root) / "knowledge/store" / "bad.parquet"
    path.parent.mkdir(parents=True)
    pd.DataFrame({"prompt_hash": ["h"], "model_id": ["m"]}).to_parquet(path)
    with pytest.raises(ValueError, match="bad.parquet"):
        known_prompt_hashes(lake, "m", "s1")


def test_sampling_version_changes_with_sampling(cfg):
    changed = cfg.model_copy(update={"llm": cfg.llm.model_copy(
        update={"sampling": cfg.llm.sampling.model_copy(update={"temperature": 0.7})})})
    assert sampling_version(cfg) == sampling_version(cfg)
    assert sampling_version(cfg) != sampling_version(changed)
