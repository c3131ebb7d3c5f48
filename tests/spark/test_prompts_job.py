"""The prompts job (spark_jobs/prompts.py) against the pandas prompt stage it replaced, on a small lake: both modes,
carried / stale / refreshed users, dirty items, a missing profile, hostile titles, the token budget; its recorded
checks and the prompts gate that reads them."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from reki_core import prompts as P
from reki_core.llm.store import known_prompt_hashes, sampling_version, write_store_shard
from reki_core.quality.gx import GateError
from reki_core.quality.prompts import gate_prompts
from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake
from spark_jobs.common import jobs_named, run_jobs
from tests.conftest import make_config
from tests.spark import prompts_reference as R
from tests.unit.test_prompts import (basic_inputs, cluster_inputs, entry, history_frame, hostile_inputs, items_frame,
                                     users_frame, with_scenario, write_features)

DAY = dt.date(1998, 3, 1)
NEXT_DAY, LATER = DAY + dt.timedelta(days=1), DAY + dt.timedelta(days=2)


def tight(cfg, max_model_len: int = 270):
    return cfg.model_copy(update={"llm": cfg.llm.model_copy(
        update={"engine": cfg.llm.engine.model_copy(update={"max_model_len": max_model_len})})})


def build(spark, cfg, lake: Lake, day) -> dict:
    """Run the job (as the DAG does, through run_jobs) and check its rows equal the pandas stage's on the same lake."""
    inputs, mode = R.load_inputs(cfg, lake, day)  # before the job writes the day (a re-run reads no own rows)
    known = known_prompt_hashes(lake, cfg.llm.engine.model_id, sampling_version(cfg))
    want = R.render_prompts(cfg, inputs, mode, P.make_token_counter(cfg), known)
    expected_keys = R.expected_prompt_keys(cfg, inputs, mode)
    [payload] = run_jobs(spark, jobs_named(["prompts"]), cfg, lake, day).values()
    [record] = [s for s in read_steps(lake, day) if s["step"] == "prompts"]
    assert record["success"] is True
    got = lake.read_partition("prompts", day)
    assert list(got.columns) == P.COLUMNS
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)
    assert {k: payload[k] for k in R.prompt_counts(want, mode)} == R.prompt_counts(want, mode)
    # What the pandas gate found on the whole frame, the job's checks found too.
    result = R.check_prompts(want, expected_keys, P.token_budget(cfg), P.make_token_counter(cfg))
    failed_columns = sorted(o.column or "" for o in result.failed)
    checks = payload["checks"]
    assert checks["fingerprint"]["rows"] == len(want)
    if result.success:
        assert checks["failed"] == {} and all(m["count"] == 0 for m in checks["missing"].values()), checks
        assert gate_prompts(cfg, day, lake).success
    else:
        with pytest.raises(GateError) as err:
            gate_prompts(cfg, day, lake)
        assert sorted(o.column or "" for o in err.value.result.failed) == failed_columns
    return payload


@pytest.fixture
def cfg(tmp_path):
    return make_config(tmp_path, REKI__SCENARIO_OVERRIDES="{extraction_mode: individual}")


def test_individual_day_missing_profile_untitled_item_and_a_store_answer(spark, cfg):
    lake = Lake(cfg.lake_uri)
    inputs = basic_inputs()
    inputs.user_history = pd.concat([inputs.user_history, history_frame([("9", [entry("3", 70, 4)], True)])],
                                    ignore_index=True)  # user 9 is not in raw/users: no profile
    untitled = items_frame([("5", "gone", 1990, ["Drama"], 3)]).assign(title=None)  # no title: no prompt
    inputs.items = pd.concat([inputs.items, untitled], ignore_index=True)
    write_features(lake, DAY, inputs)
    first = build(spark, cfg, lake, DAY)
    assert first["by_kind"] == {"item": 4, "user": 3} and first["with_knowledge"] == {"item": 0, "user": 0}
    written = lake.read_partition("prompts", DAY)
    toy = written.loc[written["prompt_id"] == "item:1", "prompt_hash"].iloc[0]
    write_store_shard(lake, cfg.llm.engine.model_id, sampling_version(cfg), "s0", [
        {"prompt_hash": toy, "model_id": cfg.llm.engine.model_id, "sampling_version": sampling_version(cfg),
         "text": "a", "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop", "created_dt": "1998-03-01",
         "truncated_prompt": False}])
    again = build(spark, cfg, lake, DAY)  # a re-run of the day: the same rows, the answered hash known
    assert again["with_knowledge"] == {"item": 1, "user": 0} and again["to_ask"] == 6


def test_hostile_titles_and_no_users_snapshot(spark, cfg):
    lake = Lake(cfg.lake_uri)
    inputs = hostile_inputs()
    lake.write_partition(inputs.user_history, "features/user_history", DAY)
    lake.write_partition(inputs.items, "features/items", DAY)  # no raw/users at all
    build(spark, cfg, lake, DAY)


def test_the_coverage_checks_count_and_name_each_kind_of_missing_key(spark, cfg):
    from spark_jobs.prompts import checks

    lake = Lake(cfg.lake_uri)
    write_features(lake, DAY, basic_inputs())
    build(spark, cfg, lake, DAY)
    rows = spark.createDataFrame(lake.read_partition("prompts", DAY))
    expected = rows.select("entity_kind", "entity_id").union(spark.createDataFrame(
        [("user", "404"), ("item", "405"), ("item_group", "g1"), ("user", "404")], ["entity_kind", "entity_id"]))
    found = checks(rows.where(rows["prompt_id"] != "item:1"), expected, cfg)["missing"]
    assert found == {"missing_dirty_entity": {"count": 3, "examples": ["item:1", "item:405", "user:404"]},
                     "missing_group": {"count": 1, "examples": ["item_group:g1"]}}


@pytest.mark.parametrize("representatives", [2, 10])
def test_collective_day(spark, tmp_path, representatives):
    cfg = with_scenario(make_config(tmp_path, REKI__SCENARIO_OVERRIDES="{extraction_mode: collective}"),
                        group_representatives=representatives)
    lake = Lake(cfg.lake_uri)
    inputs = cluster_inputs()
    inputs.clusters = pd.concat([inputs.clusters, pd.DataFrame(
        [("user_pos", "9", "p9"), ("item", "77", "i9")], columns=["clustering", "entity_id", "group_id"])])
    write_features(lake, DAY, inputs)
    payload = build(spark, cfg, lake, DAY)
    assert payload["mode"] == "collective" and payload["by_kind"]["user_neg_group"] == 1


def test_carried_refreshed_stale_users_and_dirty_items_over_three_days(spark, cfg):
    lake = Lake(cfg.lake_uri)
    write_features(lake, DAY, basic_inputs())
    build(spark, cfg, lake, DAY)
    # Day 2: user 1 needs no refresh (carried), user 2's window advanced, item 2's metadata changed.
    inputs = basic_inputs()
    inputs.user_history = history_frame([
        ("1", [entry("2", 200, 3), entry("1", 100, 5)], False),
        ("2", [entry("4", 50, 2), entry("3", 400, 5)], True),
        ("3", [], False),
    ])
    inputs.items.loc[inputs.items["item_id"] == "2", ["title", "metadata_hash"]] = ["GoldenEye (new cut)", "x"]
    write_features(lake, NEXT_DAY, inputs)
    assert build(spark, cfg, lake, NEXT_DAY)["dirty"] == {"item": 1, "user": 1}
    # Day 3 (prompts of day 2 deleted, as if that run failed): user 2's window advanced on a day without prompts,
    # so its day-1 prompt is stale and rendered again; items carry the day's own needs_refresh.
    lake.delete_partition("prompts", NEXT_DAY)
    inputs.user_history = history_frame([
        ("1", [entry("2", 200, 3), entry("1", 100, 5)], False),
        ("2", [entry("4", 50, 2), entry("3", 400, 5)], False),
        ("3", [], False),
    ])
    inputs.items["needs_refresh"] = inputs.items["item_id"] == "3"
    write_features(lake, LATER, inputs)
    later = build(spark, cfg, lake, LATER)
    assert later["dirty"] == {"item": 1, "user": 1}


def test_over_the_budget_fitted_and_carried_prompt_fitted_again(spark, cfg):
    lake = Lake(cfg.lake_uri)
    window = [entry(str(1 + n % 4), 100 + n, 4) for n in range(12)]
    first = R.PromptInputs(user_history=history_frame([("1", window, True), ("2", window[:3], True)]),
                           items=items_frame(), users=users_frame())
    write_features(lake, DAY, first)
    build(spark, cfg, lake, DAY)
    write_features(lake, NEXT_DAY, R.PromptInputs(
        user_history=history_frame([("1", window, False), ("2", window[:3], False)]), items=items_frame(),
        users=users_frame()))
    small = tight(cfg, 270)
    build(spark, small, lake, NEXT_DAY)
    prompts = lake.read_partition("prompts", NEXT_DAY).set_index("prompt_id")
    assert prompts.loc["user:1", "is_dirty"] and prompts.loc["user:1", "n_titles"] < 12


def test_a_prompt_no_fitting_can_save_fails_the_gate_naming_the_column(spark, cfg):
    lake = Lake(cfg.lake_uri)
    write_features(lake, DAY, basic_inputs())
    small = tight(cfg, cfg.llm.sampling.max_tokens + 60)  # not even one history line fits
    payload = build(spark, small, lake, DAY)
    assert payload["checks"]["failed"]["tokens_within_budget"] == 6
    with pytest.raises(GateError, match=r"(?s)prompts/dt=1998-03-01.*column 'tokens'.*6 unexpected"):
        gate_prompts(small, DAY, lake)


def test_the_gate_refuses_a_partition_rewritten_after_the_job_checked_it(spark, tmp_path):
    cfg = make_config(tmp_path, REKI__SCENARIO_OVERRIDES="{extraction_mode: collective}")
    lake = Lake(cfg.lake_uri)
    write_features(lake, DAY, cluster_inputs())
    build(spark, cfg, lake, DAY)
    written = lake.read_partition("prompts", DAY)
    lake.write_partition(written[written["entity_kind"] != "item_group"], "prompts", DAY)
    with pytest.raises(GateError, match=r"(?s)prompts/dt=1998-03-01.*partition_is_the_one_the_prompts_job_checked"):
        gate_prompts(cfg, DAY, lake)


def test_contract_violations_name_dataset_and_column(spark, cfg):
    lake = Lake(cfg.lake_uri)
    inputs = basic_inputs()
    inputs.user_history = inputs.user_history.drop(columns=["needs_refresh"])
    write_features(lake, DAY, inputs)
    with pytest.raises(P.PromptError, match=r"features/user_history/dt=1998-03-01.*needs_refresh"):
        run_jobs(spark, jobs_named(["prompts"]), cfg, lake, DAY)
    collective = with_scenario(cfg, extraction_mode="collective")
    write_features(lake, DAY, basic_inputs())
    with pytest.raises(P.PromptError, match=r"features/clusters/dt=1998-03-01"):
        run_jobs(spark, jobs_named(["prompts"]), collective, lake, DAY)


def test_the_job_as_a_spark_connect_client(spark_connect, tmp_path):
    """As the DAG's task runs it: a client of the Connect server, the wording rendered in the server's Python workers."""
    from tests.conftest import SMOKE_LLM
    from tests.spark.test_two_engines import client

    env = {"REKI__SCENARIO_OVERRIDES": "{extraction_mode: collective}"}
    cfg = make_config(tmp_path, **env)
    lake = Lake(cfg.lake_uri)
    write_features(lake, DAY, cluster_inputs())
    inputs, mode = R.load_inputs(cfg, lake, DAY)
    want = R.render_prompts(cfg, inputs, mode, P.make_token_counter(cfg), set())
    env = {**SMOKE_LLM, "REKI__PATHS__STATE_DIR": str(tmp_path / "state"), "REKI__PATHS__LAKE_URI": cfg.lake_uri,
           "REKI__PATHS__DATA_DIR": str(cfg.data_dir), "REKI__SCENARIO": "movielens", **env}
    [result] = client("run", spark_connect, env, jobs=[["prompts"]], days=[DAY.isoformat()])["results"]
    assert {k: result["prompts"][k] for k in R.prompt_counts(want, mode)} == R.prompt_counts(want, mode)
    got = lake.read_partition("prompts", DAY)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)
    assert gate_prompts(cfg, DAY, lake).success
