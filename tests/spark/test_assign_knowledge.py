"""The knowledge assignment job (spark_jobs/knowledge.py) on a small lake: both modes, carry-over, the store's shards."""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow as pa
import pytest

from reki_core.llm import runner
from reki_core.llm.store import _model_folder, sampling_version, write_parquet_atomically, write_store_shard
from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake, as_date
from spark_jobs.common import jobs_named, run_jobs
from tests.conftest import make_config

DAY, NEXT_DAY = as_date("1998-03-01"), as_date("1998-03-02")
COLUMNS = ["entity_kind", "entity_id", "encode_text", "prompt_hashes", "as_of"]
PAYLOAD_KEYS = {"mode", "users", "items", "without_answer", "carried_from_previous", "left_out", "seconds",
                "is_smoke_model"}


def h(text: str) -> str:
    return hashlib.sha256(("t1\n" + text).encode()).hexdigest()


def prompt(kind: str, entity_id: str, text: str, history: str | None = "", as_of: int = 880000000,
           ask_llm: bool = True) -> dict:
    return {"prompt_id": f"{kind}:{entity_id}", "entity_kind": kind, "entity_id": entity_id, "text": text,
            "history_text": history, "prompt_hash": h(text), "template_version": "t1", "as_of": as_of,
            "est_tokens": len(text) // 4, "has_knowledge": False, "ask_llm": ask_llm}


def answer(cfg, prompt_hash: str, text: str, model_id: str | None = None) -> dict:
    return {"prompt_hash": prompt_hash, "model_id": model_id or cfg.llm.engine.model_id,
            "sampling_version": sampling_version(cfg), "text": text, "prompt_tokens": 3, "completion_tokens": 2,
            "finish_reason": "stop", "created_dt": "1998-03-01", "truncated_prompt": False}


def old_shard(cfg, lake: Lake, name: str, rows: list[dict], columns=("prompt_hash", "model_id", "sampling_version", "text")):
    """A shard written by older code: only some of the store's columns."""
    table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in columns})
    folder = _model_folder(cfg.llm.engine.model_id, sampling_version(cfg))
    write_parquet_atomically(lake, f"{folder}/{name}.parquet", table)


def assign(spark, cfg, lake, day) -> dict:
    result = run_jobs(spark, jobs_named(["knowledge"]), cfg, lake, day)
    assert list(result) == ["llm_assign"]
    [record] = [s for s in read_steps(lake, day) if s["step"] == "llm_assign"]
    assert PAYLOAD_KEYS <= set(record) and record["success"] is True
    return result["llm_assign"]


def assigned(lake: Lake, day) -> pd.DataFrame:
    out = lake.read_partition("knowledge/assigned", day)
    assert list(out.columns) == COLUMNS
    out = out.sort_values(["entity_kind", "entity_id"]).reset_index(drop=True)
    out["prompt_hashes"] = out["prompt_hashes"].map(list)
    out["as_of"] = out["as_of"].astype("Int64")
    return out


def expected(rows: list[tuple]) -> pd.DataFrame:
    out = pd.DataFrame(rows, columns=COLUMNS).sort_values(["entity_kind", "entity_id"]).reset_index(drop=True)
    out["as_of"] = out["as_of"].astype("Int64")
    return out


@pytest.fixture
def cfg(tmp_path):
    return make_config(tmp_path, REKI__SCENARIO_OVERRIDES="{extraction_mode: individual}")


def test_individual_mode(spark, cfg):
    lake = Lake(cfg.lake_uri)
    rows = [prompt("user", "u0", "prompt u0", history="  User u0 watched 1. \n", as_of=11),
            prompt("user", "u1", "prompt u1", history=" \t\x1c ", as_of=12),  # whitespace only: dropped
            prompt("user", "u2", "prompt u2", history=None, as_of=13),
            prompt("item", "i0", "prompt i0", history=None, as_of=14),
            prompt("item", "i1", "prompt i1", as_of=15),  # no answer, no earlier assignment: left out
            prompt("user", "u3", "prompt u3", history="h3", as_of=16)]  # answered by another model only
    lake.write_partition(pd.DataFrame(rows), "prompts", DAY)
    model, sv = cfg.llm.engine.model_id, sampling_version(cfg)
    write_store_shard(lake, model, sv, "a-shard", [
        answer(cfg, h("prompt u0"), "first u0"), answer(cfg, h("prompt u1"), "  u1 likes\u00a0"),
        answer(cfg, h("prompt i0"), "\u3000item zero\n"), answer(cfg, h("not today"), "unused"),
        answer(cfg, h("prompt u3"), "other model", model_id="someone/else")])
    # An older shard (only the required columns), later in file order: its repeat of u0's hash is the one kept.
    old_shard(cfg, lake, "b-shard", [answer(cfg, h("prompt u0"), "u0 answer "), answer(cfg, h("prompt u2"), "")])

    result = assign(spark, cfg, lake, DAY)
    assert {k: result[k] for k in ("mode", "users", "items", "without_answer", "carried_from_previous", "left_out")} == {
        "mode": "individual", "users": 3, "items": 1, "without_answer": 2, "carried_from_previous": 0, "left_out": 2}
    pd.testing.assert_frame_equal(assigned(lake, DAY), expected([
        ("item", "i0", "item zero", [h("prompt i0")], 14),
        ("user", "u0", "User u0 watched 1.\nu0 answer", [h("prompt u0")], 11),
        ("user", "u1", "u1 likes", [h("prompt u1")], 12),
        ("user", "u2", "", [h("prompt u2")], 13),  # an empty answer is still an answer
    ]))


COLLECTIVE_ENV = {"REKI__SCENARIO_OVERRIDES": "{extraction_mode: collective}"}


def collective_lake(cfg, lake: Lake, flagged: bool = True) -> pd.DataFrame:
    """A collective day's prompts, clusters and answers; the rows the job must write."""
    rows = [prompt("user", u, f"individual prompt {u}", history=f"{u} history", as_of=a, ask_llm=False)
            for u, a in (("u1", 21), ("u2", 22), ("u3", 23))]
    rows += [prompt("item_group", g, f"items of {g}", as_of=30 + n) for n, g in enumerate(("ig0", "ig1", "ig2"))]
    rows += [prompt("user_pos_group", g, f"liked by {g}", as_of=40 + n) for n, g in enumerate(("pg0", "pg1", "pg2"))]
    rows += [prompt("user_neg_group", "ng0", "disliked by ng0", as_of=50)]
    if not flagged:  # prompts written before the prompt stage flagged the rows the LLM answers
        rows = [{k: v for k, v in r.items() if k != "ask_llm"} for r in rows]
    lake.write_partition(pd.DataFrame(rows), "prompts", DAY)
    clusters = pd.DataFrame(
        [("item", i, "ig0") for i in ("i1", "i2", "i3")] + [("item", "i4", "ig1"), ("item", "i5", "ig9")]
        + [("item", "i6", "ig2")]
        + [("user_pos", "u1", "pg0"), ("user_pos", "u2", "pg0"), ("user_pos", "u3", "pg1"), ("user_pos", "u4", "pg1")]
        + [("user_pos", "u5", "pg2")]
        + [("user_neg", "u1", "ng0"), ("user_neg", "u2", "ng0"), ("user_neg", "u5", "ng0")],
        columns=["clustering", "entity_id", "group_id"]).assign(group_size=1)
    lake.write_partition(clusters, "features/clusters", DAY)
    answered = ["items of ig0", "items of ig1", "liked by pg0", "liked by pg1", "disliked by ng0"]  # not ig2, pg2
    write_store_shard(lake, cfg.llm.engine.model_id, sampling_version(cfg), "shard",
                      [answer(cfg, h(t), f"A({t}) ") for t in answered])
    pos, neg = h("liked by pg0"), h("disliked by ng0")
    return expected([
        *[("item", i, "A(items of ig0)", [h("items of ig0")], 30) for i in ("i1", "i2", "i3")],
        ("item", "i4", "A(items of ig1)", [h("items of ig1")], 31),
        ("user", "u1", "u1 history\nLiked: A(liked by pg0)\nDisliked: A(disliked by ng0)", [pos, neg], 21),
        ("user", "u2", "u2 history\nLiked: A(liked by pg0)\nDisliked: A(disliked by ng0)", [pos, neg], 22),
        ("user", "u3", "u3 history\nLiked: A(liked by pg1)", [h("liked by pg1")], 23),  # no negative group
        ("user", "u4", "Liked: A(liked by pg1)", [h("liked by pg1")], 41),  # no user prompt: the group's as_of
    ])


# i5: its group has no prompt; i6 and u5: their group's prompt has no answer.
COLLECTIVE_COUNTS = {"mode": "collective", "users": 4, "items": 4, "without_answer": 3, "carried_from_previous": 0,
                     "left_out": 3}


@pytest.mark.parametrize("flagged", [True, False], ids=["ask_llm-column", "mode-from-config"])
def test_collective_mode(spark, tmp_path, flagged):
    cfg = make_config(tmp_path, **COLLECTIVE_ENV)
    lake = Lake(cfg.lake_uri)
    rows = collective_lake(cfg, lake, flagged)
    result = assign(spark, cfg, lake, DAY)
    assert {k: result[k] for k in COLLECTIVE_COUNTS} == COLLECTIVE_COUNTS
    pd.testing.assert_frame_equal(assigned(lake, DAY), rows)


def test_the_job_as_a_spark_connect_client(spark_connect, tmp_path):
    """As the DAG's task runs it: a client of the Connect server (the store's shards read through the server)."""
    from tests.conftest import SMOKE_LLM
    from tests.spark.test_two_engines import client

    cfg = make_config(tmp_path, **COLLECTIVE_ENV)
    lake = Lake(cfg.lake_uri)
    rows = collective_lake(cfg, lake)
    env = {**SMOKE_LLM, "REKI__PATHS__STATE_DIR": str(tmp_path / "state"), "REKI__PATHS__LAKE_URI": cfg.lake_uri,
           "REKI__PATHS__DATA_DIR": str(cfg.data_dir), "REKI__SCENARIO": "movielens", **COLLECTIVE_ENV}
    [result] = client("run", spark_connect, env, jobs=[["knowledge"]], days=[DAY.isoformat()])["results"]
    assert {k: result["llm_assign"][k] for k in COLLECTIVE_COUNTS} == COLLECTIVE_COUNTS
    pd.testing.assert_frame_equal(assigned(lake, DAY), rows)


def test_entity_without_an_answer_keeps_its_previous_row(spark, cfg):
    lake = Lake(cfg.lake_uri)
    model, sv = cfg.llm.engine.model_id, sampling_version(cfg)
    day_one = [prompt("user", "u0", "u0 v1", history="u0 h1", as_of=1), prompt("user", "u1", "u1 v1", as_of=2),
               prompt("item", "i0", "i0 v1", as_of=3)]
    lake.write_partition(pd.DataFrame(day_one), "prompts", DAY)
    write_store_shard(lake, model, sv, "day1", [answer(cfg, r["prompt_hash"], "old") for r in day_one])
    assert assign(spark, cfg, lake, DAY)["without_answer"] == 0

    day_two = [prompt("user", "u0", "u0 v2", history="u0 h2", as_of=5), prompt("user", "u1", "u1 v2", as_of=6),
               prompt("item", "i0", "i0 v2", as_of=7), prompt("item", "i9", "i9 v2", as_of=8)]
    lake.write_partition(pd.DataFrame(day_two), "prompts", NEXT_DAY)
    write_store_shard(lake, model, sv, "day2", [answer(cfg, h("u1 v2"), "new"), answer(cfg, h("i0 v2"), "new")])
    result = assign(spark, cfg, lake, NEXT_DAY)
    assert {k: result[k] for k in ("users", "items", "without_answer", "carried_from_previous", "left_out")} == {
        "users": 2, "items": 1, "without_answer": 2, "carried_from_previous": 1, "left_out": 1}
    pd.testing.assert_frame_equal(assigned(lake, NEXT_DAY), expected([
        ("item", "i0", "new", [h("i0 v2")], 7),
        ("user", "u0", "u0 h1\nold", [h("u0 v1")], 1),  # yesterday's row as it was
        ("user", "u1", "new", [h("u1 v2")], 6),
    ]))
    # A re-run of the day gives the same rows (its own partition is not an earlier assignment); runner.assign_knowledge,
    # which the in-process pipeline driver and the benchmarks call, runs the same job.
    assert runner.assign_knowledge(cfg, NEXT_DAY, spark)["carried_from_previous"] == 1
    assert len(assigned(lake, NEXT_DAY)) == 3


def test_a_shard_without_a_required_column_is_refused(spark, cfg):
    lake = Lake(cfg.lake_uri)
    lake.write_partition(pd.DataFrame([prompt("item", "i0", "i0")]), "prompts", DAY)
    old_shard(cfg, lake, "no-text", [answer(cfg, h("i0"), "x")], columns=("prompt_hash", "model_id", "sampling_version"))
    with pytest.raises(Exception, match=r"no-text\.parquet: missing columns \[text\]"):
        assign(spark, cfg, lake, DAY)
