"""The vectors gate's rules, evaluated by the Spark job `vectors_checks` over the vectors augment wrote and expected by
the gate on what it recorded: each rule fails on bad vectors (naming the column, the whole count and offenders) and
passes on good ones; the job's fingerprint refuses vectors rewritten after it checked them."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from reki_core.quality.gx import GateError
from reki_core.quality.vectors import gate_vectors
from reki_core.storage.lake import Lake
from spark_jobs.common import jobs_named, run_jobs

DAY = dt.date(2024, 1, 2)


def seed(lake, vectors: pd.DataFrame, users=("u1", "u2"), without_answer=()) -> None:
    """Users (and item i1) of the day; `without_answer`: users whose LLM call failed with nothing to fall back on."""
    lake.write_partition(pd.DataFrame({"user_id": list(users)}), "features/user_history", DAY)
    lake.write_partition(pd.DataFrame({"item_id": ["i1"]}), "features/items", DAY)
    assigned = [("user", u) for u in users if u not in without_answer] + [("item", "i1")]
    lake.write_partition(pd.DataFrame({"entity_kind": [k for k, _ in assigned], "entity_id": [e for _, e in assigned]}),
                         "knowledge/assigned", DAY)
    lake.write_partition(vectors, "vectors/augmented", DAY)


def vectors(rows=(("user", "u1"), ("user", "u2"), ("item", "i1")), dim=32, value=0.5, version="m1"):
    return pd.DataFrame({"entity_kind": [k for k, _ in rows], "entity_id": [e for _, e in rows],
                         "vector": [np.full(dim, value, dtype=np.float32).tolist() for _ in rows],
                         "model_version": version})


def gated(spark, cfg, lake) -> dict:
    """The job (as the DAG's vectors_checks task runs it), then the gate."""
    run_jobs(spark, jobs_named(["vectors_checks"]), cfg, lake, DAY)
    return gate_vectors(cfg, DAY, lake)


def failure(spark, cfg, lake) -> str:
    with pytest.raises(GateError) as err:
        gated(spark, cfg, lake)
    assert lake.read_json(f"_runs/dt={DAY}/vectors_gate.json")["success"] is False
    return str(err.value)


def line_of(message: str, column: str) -> str:
    [line] = [line for line in message.splitlines() if f"column '{column}'" in line]
    return line


def test_complete_vectors_pass(spark, cfg, lake):
    seed(lake, vectors())
    summary = gated(spark, cfg, lake)
    assert summary["success"] is True and summary["rows"] == 3


@pytest.mark.parametrize("bad, column, count, named", [
    (vectors(rows=(("user", "u1"), ("item", "i1"))), "lost_vector", 1, "user:u2"),
    (vectors(rows=(("user", "u1"), ("user", "u2"), ("item", "i1"), ("user", "u1"))), "key", 2, "user:u1"),
    (vectors(dim=16), "dim", 3, "16"),
    (vectors(value=float("nan")), "finite", 3, None),
    (vectors(rows=(("user", "u1"), ("user", "u2"), ("item", "i1"), ("item", "ghost"))), "expected", 1, None),
], ids=["missing-user", "duplicate", "wrong-dim", "nan", "unknown-entity"])
def test_bad_vectors_fail_naming_the_column_and_the_whole_count(spark, cfg, lake, bad, column, count, named):
    seed(lake, bad)
    line = line_of(failure(spark, cfg, lake), column)
    assert f"{count} unexpected" in line, line
    if named:
        assert named in line, line


def test_one_model_version(spark, cfg, lake):
    seed(lake, pd.concat([vectors(rows=(("user", "u1"), ("user", "u2"))), vectors(rows=(("item", "i1"),), version="m2")],
                         ignore_index=True))
    assert "observed 2" in line_of(failure(spark, cfg, lake), "model_version")


def test_only_entities_whose_llm_call_failed_may_go_without_a_vector(spark, cfg, lake):
    users = [f"u{i}" for i in range(40)]
    rows = [("user", u) for u in users[1:]] + [("item", "i1")]
    seed(lake, vectors(rows=rows), users=users, without_answer=["u0"])  # 1 of 41 (< 5%) serves the fallback
    assert gated(spark, cfg, lake)["success"] is True

    seed(lake, vectors(rows=rows), users=users)  # u0 had knowledge: its vector was lost on the way
    message = failure(spark, cfg, lake)
    assert "user:u0" in line_of(message, "lost_vector")
    assert "column 'has_vector'" not in message  # within the fallback share: only the loss is named

    rows = [("user", u) for u in users[3:]] + [("item", "i1")]
    seed(lake, vectors(rows=rows), users=users, without_answer=users[:3])  # 3 of 41 LLM failures: over 5%
    assert "3 unexpected" in line_of(failure(spark, cfg, lake), "has_vector")


def test_a_bad_vector_among_many_is_found_and_the_gate_streams_in_batches(spark, cfg, lake):
    one_row = cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"batch_rows": 1})})
    rows = vectors()
    rows.at[2, "vector"] = [0.5] * 31 + [float("inf")]  # the last row, in the last batch of one
    seed(lake, rows)
    assert "1 unexpected" in line_of(failure(spark, one_row, lake), "finite")
    seed(lake, vectors())
    assert gated(spark, one_row, lake)["success"] is True


def test_vectors_rewritten_after_the_job_or_never_checked_are_refused(spark, cfg, lake):
    seed(lake, vectors())
    with pytest.raises(GateError, match=r"(?s)vectors_checks_job_recorded_its_checks.*run the vectors_checks task"):
        gate_vectors(cfg, DAY, lake)
    assert gated(spark, cfg, lake)["success"]
    seed(lake, vectors(value=float("nan")))  # the same ids and version, other values: still refused
    with pytest.raises(GateError, match=r"(?s)partition_is_the_one_the_vectors_checks_job_checked.*re-run"):
        gate_vectors(cfg, DAY, lake)


def test_the_job_as_a_spark_connect_client(spark_connect, tmp_path):
    """As the DAG's task runs it: a client of the Connect server."""
    from tests.conftest import make_config
    from tests.spark.test_two_engines import client

    cfg = make_config(tmp_path)
    lake = Lake(cfg.lake_uri)
    seed(lake, vectors(dim=16))
    env = {"REKI__PATHS__STATE_DIR": str(tmp_path / "state"), "REKI__PATHS__LAKE_URI": cfg.lake_uri,
           "REKI__PATHS__DATA_DIR": str(cfg.data_dir)}
    [result] = client("run", spark_connect, env, jobs=[["vectors_checks"]], days=[DAY.isoformat()])["results"]
    assert result["vectors_checks"]["checks"]["failed"] == {"dim": 3}
    with pytest.raises(GateError, match="column 'dim'"):
        gate_vectors(cfg, DAY, lake)
