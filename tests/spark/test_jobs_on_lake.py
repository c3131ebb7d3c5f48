"""The jobs against a lake: daily chain, re-run overwrites its partition, feature gates, real spark-submit."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from unittest import mock

import pytest

from reki_core.config import PROJECT_ROOT
from reki_core.datasets import synthetic
from reki_core.datasets.schema import day_bounds
from reki_core.quality.features import run_feature_gates
from reki_core.quality.gx import GateError
from reki_core.runlog import read_steps
from spark_jobs import clusters, ctr_samples, items, user_history
from spark_jobs.common import jobs_named, run_jobs

JOBS = (items, user_history, ctr_samples, clusters)


def _make_cfg(tmp_path):
    from reki_core.config import load_config

    env = {"REKI__PATHS__LAKE_URI": str(tmp_path / "lake"), "REKI__PATHS__STATE_DIR": str(tmp_path / "state"),
           "REKI__SCENARIO": "books", "REKI__SPARK__SHUFFLE_PARTITIONS": "2",
           "REKI__SCENARIO_OVERRIDES": "{max_group_size_items: 12, max_group_size_users: 10, extraction_mode: collective}"}
    return load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ=env)


def _deliver_a_quiet_day(lake, like: dt.date, day: dt.date) -> None:
    """Raw data for `day` with no interactions and the user and item snapshots of `like` (nothing changes)."""
    lake.write_partition(lake.read_partition("raw/interactions", like).iloc[0:0], "raw/interactions", day)
    for ds in ("raw/users", "raw/items"):
        lake.write_partition(lake.read_partition(ds, like), ds, day)


def test_daily_chain_rerun_overwrites_gates_pass_and_fail(spark, tmp_path):
    from reki_core.storage.lake import Lake

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(900, n_users=20, n_items=40, days=3, seed=5, start=dt.date(2024, 5, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    for day in days[-2:]:
        for job in JOBS:
            job.run(spark, cfg, lake, day)
    last = days[-1]
    lake_keyed = ("features/user_history", "features/knowledge_versions", "features/ctr_samples")
    before = {ds: lake.read_partition(ds, last) for ds in ("features/user_history", "features/ctr_samples", "features/clusters")}
    stored_before = {ds: len(lake.read_day_rows(ds, last)) for ds in lake_keyed}
    assert all(0 < n <= len(before[ds]) for ds, n in stored_before.items() if ds in before), stored_before
    for job in JOBS:  # a re-run of the date replaces its partitions with the same content
        job.run(spark, cfg, lake, last)
    for ds, frame in before.items():
        again = lake.read_partition(ds, last)
        assert len(again) == len(frame)
        keys = ["clustering", "entity_id"] if ds.endswith("clusters") else ["user_id"] + (["ts", "item_id"] if "ctr" in ds else [])
        a, b = frame.sort_values(keys).reset_index(drop=True), again.sort_values(keys).reset_index(drop=True)
        assert a.astype(str).equals(b.astype(str)), ds
    # The re-run replaced exactly that day's changes: the same rows stored, none doubled.
    assert {ds: len(lake.read_day_rows(ds, last)) for ds in lake_keyed} == stored_before
    # Every interaction after its user's first window version is a sample; none before it is.
    first_as_of = lake.read_partition("features/knowledge_versions", last).groupby("user_id")["as_of"].min()
    later = data.interactions["ts"] > data.interactions["user_id"].map(first_as_of)
    assert len(lake.read_partition("features/ctr_samples", last)) == int(later.sum())

    run_jobs(spark, jobs_named(["feature_checks"]), cfg, lake, last)  # the DAG's feature_checks task
    summary = run_feature_gates(cfg, last, lake)
    assert summary["success"] and len(summary["gates"]) == 4
    assert any(s["step"] == "feature_gates" for s in read_steps(lake, last))

    # Break the label rate and a group size: the gate stops with both named and counted.
    samples = lake.read_partition("features/ctr_samples", last)
    samples["label"] = 1
    lake.write_partition(samples, "features/ctr_samples", last)
    groups = lake.read_partition("features/clusters", last)
    groups.loc[groups["clustering"] == "user_pos", "group_id"] = "one-big-group"
    lake.write_partition(groups, "features/clusters", last)
    run_jobs(spark, jobs_named(["feature_checks"]), cfg, lake, last)
    with pytest.raises(GateError) as err:
        run_feature_gates(cfg, last, lake)
    message = str(err.value)
    assert "column 'label_rate'" in message  # the state's rate, counted from its rows (written without totals)
    assert "group_over_size_bound" in message and "1 unexpected" in message and "user_pos:one-big-group" in message


def test_spark_submit_runs_a_job_file(tmp_path):
    from reki_core.config import load_config
    from reki_core.spark import submit_java_options
    from reki_core.storage.lake import Lake

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(300, n_users=10, n_items=20, days=2, seed=9, start=dt.date(2024, 6, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    venv_bin = PROJECT_ROOT / ".venv" / "bin"
    # spark-submit finds SPARK_HOME through the `python3` on PATH: the venv's, as the DAG task sets it.
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "REKI__SCENARIO": "books",
           "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "PYSPARK_PYTHON": str(venv_bin / "python")}
    # The README's driver options (log configuration and JIT settings) for a job submitted by hand.
    java_options = submit_java_options(load_config(PROJECT_ROOT / "conf/reki.yaml", environ={}))
    from reki_core.jars import spark_jar_conf

    jars = [arg for key, value in spark_jar_conf().items() for arg in ("--conf", f"{key}={value}")]  # Iceberg's
    cmd = [str(PROJECT_ROOT / ".venv/bin/spark-submit"), "--master", "local[1]", *jars,
           "--conf", f"spark.driver.extraJavaOptions={java_options}", str(PROJECT_ROOT / "spark_jobs/items.py"),
           "--lake", cfg.lake_uri, "--dt", days[-1].isoformat()]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert " INFO " not in result.stderr, "conf/spark-log4j2.properties keeps Spark's INFO lines out of the task log"
    out = lake.read_partition("features/items", days[-1])
    assert set(out["item_id"]) == set(data.items["item_id"])
    assert out["popularity"].sum() == len(data.interactions)
    assert any(s["step"] == "features_items" for s in read_steps(lake, days[-1]))


def test_daily_runs_write_only_touched_users_and_equal_a_full_build(spark, tmp_path):
    """A daily run after a daily run recomputes and writes only the users whose rows can change; the state of every
    user-keyed dataset as of that day equals a full build of the same day, row for row. The users it must catch although
    they rated nothing that day: one whose item changed genre (samples), one whose window item changed
    title (history), one whose profile changed (history)."""
    from reki_core.storage.lake import Lake

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(400, n_users=60, n_items=30, days=20, seed=11, start=dt.date(2024, 7, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    first, prev, last = days[-3], days[-2], days[-1]
    inter_days = synthetic.interaction_days(data.interactions)
    # Idle: no interaction on the last two days (a refresh on the previous day also rewrites the next day).
    idle = sorted(set(data.interactions["user_id"]) - set(data.interactions.loc[inter_days >= prev, "user_id"]))
    rows = data.interactions.assign(day=inter_days)[data.interactions["user_id"].isin(idle)].sort_values(["user_id", "ts"])
    spread = rows.groupby("user_id")["day"].nunique()
    regenre_user = spread[spread >= 2].index[0]
    regenred = rows.loc[rows["user_id"] == regenre_user, "item_id"].iloc[-2]  # in the history features of a sample
    retitle_user = next(u for u in idle if u != regenre_user)
    for job in (items, user_history, ctr_samples):
        job.run(spark, cfg, lake, first)  # a full build
    for job in (items, user_history):
        job.run(spark, cfg, lake, prev)  # a daily run after it
    retitled = lake.read_partition("features/user_history", prev).set_index("user_id").loc[retitle_user, "window"][0]["item_id"]
    reprofiled = next(u for u in idle if u not in (regenre_user, retitle_user))
    snapshot = lake.read_partition("raw/items", last)
    snapshot["genres"] = [["Regenred"] if i == regenred else list(g) for i, g in zip(snapshot["item_id"], snapshot["genres"])]
    snapshot.loc[snapshot["item_id"] == retitled, "title"] = "Retitled (1999)"
    lake.write_partition(snapshot, "raw/items", last)
    profiles = lake.read_partition("raw/users", last)
    profiles.loc[profiles["user_id"] == reprofiled, "occupation"] = "retitled occupation"
    lake.write_partition(profiles, "raw/users", last)

    ctr_samples.run(spark, cfg, lake, prev)
    summaries = {job: job.run(spark, cfg, lake, last) for job in (items, user_history, ctr_samples)}
    datasets = ("features/user_history", "features/knowledge_versions", "features/ctr_samples")
    chained = {ds: lake.read_partition(ds, last) for ds in datasets}
    assert all(summaries[job]["incremental_from"] == prev.isoformat() for job in (user_history, ctr_samples))
    # Some users were written, not all; each written user's rows are all there (a user is replaced whole).
    written = {ds: lake.read_day_rows(ds, last) for ds in datasets}
    written_users = set(written["features/user_history"]["user_id"])
    assert 0 < summaries[user_history]["users_written"] == len(written_users) < summaries[user_history]["users"]
    assert {retitle_user, reprofiled} <= written_users
    samples_users = set(written["features/ctr_samples"]["user_id"])
    assert regenre_user in samples_users and samples_users < set(chained["features/ctr_samples"]["user_id"])
    for ds in ("features/knowledge_versions", "features/ctr_samples"):
        mine = chained[ds][chained[ds]["user_id"].isin(set(written[ds]["user_id"]))]
        assert len(mine) == len(written[ds]), ds

    history = chained["features/user_history"].set_index("user_id")
    assert history.loc[retitle_user, "window"][0]["title"] == "Retitled"
    assert history.loc[reprofiled, "occupation"] == "retitled occupation"
    assert chained["features/ctr_samples"]["hist_genres"].map(lambda g: "Regenred" in list(g)).any()

    # The rewritten users' samples as of the previous day, which the daily run subtracted from the totals, are their
    # new samples up to that day's end: the same rows (keys, label, split).
    keys = ["user_id", "item_id", "ts", "label", "split"]
    rewritten = written["features/ctr_samples"]
    earlier = rewritten[rewritten["ts"] < day_bounds(prev)[1]][keys].sort_values(keys, ignore_index=True)
    had = lake.read_partition("features/ctr_samples", prev)
    had = had[had["user_id"].isin(samples_users)][keys].sort_values(keys, ignore_index=True)
    assert 0 < len(earlier) < len(rewritten)
    assert earlier.astype(str).equals(had.astype(str))
    # user_history took its users' earliest versions from their previous rows; as of a lake written before the counts
    # it takes them from every version of its users again: a re-run that way writes the same rows.
    with mock.patch.object(type(lake), "column_names", return_value=[]):
        user_history.run(spark, cfg, lake, last)
    again = lake.read_day_rows("features/user_history", last).sort_values("user_id", ignore_index=True)
    before = written["features/user_history"].sort_values("user_id", ignore_index=True)
    assert list(again.columns) == list(before.columns) and len(again) == len(before) > 0
    assert [c for c in before.columns if not before[c].astype(str).equals(again[c].astype(str))] == []

    _assert_totals_are_the_states(cfg, lake, last, summaries, carried=True)
    _assert_state_equals_a_full_build(spark, cfg, lake, last, chained, (first, prev))


def _assert_totals_are_the_states(cfg, lake, day, summaries, carried: bool) -> None:
    """The run-log totals a daily run carried from the previous day's (plus its changes) equal the state's own."""
    history = lake.read_partition("features/user_history", day)
    samples = lake.read_partition("features/ctr_samples", day)
    expected = {"users": len(history), "dirty_users": int(history["needs_refresh"].sum()),
                "interactions": int(history["n_interactions"].sum()),
                "users_shorter_than_max_window": int((history["n_interactions"] < cfg.scenario.max_window).sum()),
                "knowledge_versions": len(lake.read_partition("features/knowledge_versions", day))}
    assert {k: summaries[user_history][k] for k in expected} == expected
    # Each user's row counts the user's samples (what ctr_samples' daily totals subtract when it rewrites the user).
    made = samples.groupby("user_id")["label"].agg(["size", "sum"])
    counted = history.set_index("user_id")[["samples", "positive_samples"]]
    assert (counted.loc[made.index, "samples"].to_numpy() == made["size"].to_numpy()).all()
    assert (counted.loc[made.index, "positive_samples"].to_numpy() == made["sum"].to_numpy()).all()
    assert (counted.drop(made.index)["samples"] == 0).all()
    per_split = samples["split"].value_counts().to_dict()
    assert summaries[ctr_samples]["samples"] == len(samples) and summaries[ctr_samples]["samples_per_split"] == per_split
    assert summaries[ctr_samples]["label_rate"] == pytest.approx(samples["label"].mean())
    assert summaries[ctr_samples]["interactions_without_earlier_knowledge"] == expected["interactions"] - len(samples)
    for job in (user_history, ctr_samples):
        assert summaries[job]["totals_from"] == ("previous day" if carried else "aggregate"), job.DATASET
        assert lake.state_totals(job.DATASET, day) is not None


def _assert_state_equals_a_full_build(spark, cfg, lake, last, chained, earlier_days) -> None:
    """The state of each user-keyed dataset as of `last` (`chained`, read before) equals a full build of `last` from the
    raw history alone, row for row."""
    datasets = ("features/user_history", "features/knowledge_versions", "features/ctr_samples")
    for ds in datasets:
        for day in earlier_days:
            lake.delete_partition(ds, day)
    for job in (user_history, ctr_samples):
        assert job.run(spark, cfg, lake, last)["incremental_from"] is None
    for ds in datasets:
        full = lake.read_partition(ds, last)
        if ds == "features/user_history":  # a full build flags every user for refresh; a daily run only its own
            assert full["needs_refresh"].all() and not chained[ds]["needs_refresh"].all()
            full, chained[ds] = full.drop(columns="needs_refresh"), chained[ds].drop(columns="needs_refresh")
        assert list(full.columns) == list(chained[ds].columns), ds
        keys = {"features/user_history": ["user_id"], "features/knowledge_versions": ["user_id", "window_n"],
                "features/ctr_samples": ["user_id", "ts", "item_id"]}[ds]
        full, again = (f.sort_values(keys, ignore_index=True) for f in (full, chained[ds]))
        diff = [c for c in full.columns if not full[c].astype(str).equals(again[c].astype(str))]
        assert not diff, (ds, diff)  # same rows


def test_a_plain_daily_run_reads_only_the_days_since_and_equals_a_full_build(spark, tmp_path):
    """On a day no item changed genre, ctr_samples reads its users' histories and versions from the days user_history
    wrote since its previous day alone (`written_after`); the state still equals a full build. A run after a day that
    recorded no totals aggregates them over the state, and records them for the next day to carry."""
    from reki_core.storage.lake import TOTALS_PROPERTY, Lake

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(400, n_users=60, n_items=30, days=20, seed=17, start=dt.date(2024, 9, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    first, prev, last = days[-3], days[-2], days[-1]
    for day in (first, prev):
        for job in (items, user_history, ctr_samples):
            job.run(spark, cfg, lake, day)
    for job in (user_history, ctr_samples):  # as a lake written before totals were recorded
        with lake.load_table(job.DATASET).transaction() as tx:
            tx.remove_properties(f"{TOTALS_PROPERTY}{prev.isoformat()}")
    summaries = {job: job.run(spark, cfg, lake, last) for job in (items, user_history, ctr_samples)}
    assert ctr_samples.regenred_items(lake, last, prev) == []  # so only the days since prev were read
    _assert_totals_are_the_states(cfg, lake, last, summaries, carried=False)
    again = {job: job.run(spark, cfg, lake, last) for job in (user_history, ctr_samples)}  # a re-run
    assert again[ctr_samples] == summaries[ctr_samples]
    for job in (user_history, ctr_samples):  # prev recorded none, so the re-run aggregated again: same totals
        assert again[job]["totals_from"] == "aggregate"
    next_day = last + dt.timedelta(days=1)  # a quiet day after it carries the totals it recorded
    _deliver_a_quiet_day(lake, last, next_day)
    quiet = {job: job.run(spark, cfg, lake, next_day) for job in (items, user_history, ctr_samples)}
    _assert_totals_are_the_states(cfg, lake, next_day, quiet, carried=True)
    assert summaries[ctr_samples]["samples_written"] > 0
    chained = {ds: lake.read_partition(ds, last)
               for ds in ("features/user_history", "features/knowledge_versions", "features/ctr_samples")}
    for ds in chained:
        lake.delete_partition(ds, next_day)
    _assert_state_equals_a_full_build(spark, cfg, lake, last, chained, (first, prev))


def test_a_quiet_day_writes_no_user(spark, tmp_path):
    """Days with no interactions and unchanged snapshots write no user: yesterday's refresh flags fall back by
    themselves (a flag holds only on the day its row was written), and the state is the day before's."""
    from reki_core.storage.lake import Lake

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(400, n_users=30, n_items=30, days=4, seed=13, start=dt.date(2024, 8, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    quiet = [days[-1] + dt.timedelta(days=1), days[-1] + dt.timedelta(days=2)]
    for day in quiet:
        _deliver_a_quiet_day(lake, days[-1], day)
    for day in days[-2:] + quiet[:1]:
        for job in (items, user_history, ctr_samples):
            job.run(spark, cfg, lake, day)
    assert lake.read_partition("features/user_history", days[-1])["needs_refresh"].sum() > 0
    assert len(lake.read_day_rows("features/user_history", quiet[0])) == 0
    assert lake.read_partition("features/user_history", quiet[0])["needs_refresh"].sum() == 0
    items.run(spark, cfg, lake, quiet[1])  # the item table is small and rebuilt every day
    summaries = {job: job.run(spark, cfg, lake, quiet[1]) for job in (user_history, ctr_samples)}
    assert summaries[user_history]["users_written"] == 0 and summaries[ctr_samples]["samples_written"] == 0
    for job, summary in summaries.items():
        assert summary["incremental_from"] == quiet[0].isoformat(), summary
        assert len(lake.read_day_rows(job.DATASET, quiet[1])) == 0
        a, b = lake.read_partition(job.DATASET, quiet[0]), lake.read_partition(job.DATASET, quiet[1])
        assert len(a) > 0 and a.astype(str).equals(b.astype(str))
        assert len(lake.read_day_rows(job.DATASET, quiet[0])) == 0
    assert summaries[user_history]["dirty_users"] == 0


def test_a_rerun_keeps_the_groups_of_unchanged_inputs_and_regroups_changed_ones(spark, tmp_path):
    """The day's groups are recorded with a fingerprint of their inputs: a re-run of the day with the same inputs keeps
    them (no new snapshot), a day whose inputs equal the day before's gets that day's groups written again, a changed
    item is grouped again, and rows another writer replaces lose the fingerprint."""
    from reki_core.storage.lake import Lake

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(500, n_users=20, n_items=30, days=2, seed=17, start=dt.date(2024, 9, 1))
    day = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)[-1]
    for job in (items, user_history):
        job.run(spark, cfg, lake, day)
    snapshot = lambda: lake.load_table("features/clusters").current_snapshot().snapshot_id  # noqa: E731
    first = clusters.run(spark, cfg, lake, day)
    assert first["groups_kept"] is False
    fingerprint, written = lake.day_inputs("features/clusters", day), snapshot()
    assert len(fingerprint) == 64 and len(lake.read_partition("features/clusters", day)) > 0

    again = clusters.run(spark, cfg, lake, day)
    assert again["groups_kept"] is True and again["clusterings"] == first["clusterings"]
    assert snapshot() == written and lake.day_inputs("features/clusters", day) == fingerprint

    # A day on which no window and no item changed gets the day before's groups, written again, not grouped again.
    quiet = day + dt.timedelta(days=1)
    _deliver_a_quiet_day(lake, day, quiet)
    for job in (items, user_history):
        job.run(spark, cfg, lake, quiet)
    copied = clusters.run(spark, cfg, lake, quiet)
    assert copied["groups_kept"] is True and copied["grouped_on"] == day.isoformat()
    keys = ["clustering", "entity_id"]
    groups = lake.read_partition("features/clusters", day).sort_values(keys).reset_index(drop=True)
    assert groups.astype(str).equals(lake.read_partition("features/clusters", quiet).sort_values(keys)
                                      .reset_index(drop=True).astype(str))
    assert lake.day_inputs("features/clusters", quiet) == fingerprint

    described = lake.read_partition("features/items", quiet)
    described.at[described.index[0], "genres"] = ["a-genre-of-its-own"]
    lake.write_partition(described, "features/items", quiet)
    changed = clusters.run(spark, cfg, lake, quiet)
    assert changed["groups_kept"] is False and changed["grouped_on"] == quiet.isoformat()
    assert lake.day_inputs("features/clusters", quiet) not in (None, fingerprint)

    # Rows replaced by another writer lose the fingerprint with the rows it described: they can never be kept.
    lake.write_partition(lake.read_partition("features/clusters", day), "features/clusters", day)
    assert lake.day_inputs("features/clusters", day) is None


def test_a_long_chain_of_change_days_is_consolidated_into_one_full_day(spark, tmp_path):
    """Past `max_change_days`, the newest day of each keyed dataset is rewritten as a full day: its state and totals
    are what they were, the next daily run builds on that one day and still equals a full build, and a write of a day
    after a consolidation read it makes the consolidation's commit fail instead of replacing that write."""
    from pyspark.sql import functions as F

    from reki_core.storage.lake import FULL_DAY, KEYED_DATASETS, Lake
    from reki_core.storage.maintenance import consolidate_states
    from spark_jobs.common import STATE_ORDER, consolidate_state, write_partition

    cfg = _make_cfg(tmp_path)
    lake = Lake(cfg.lake_uri)
    data = synthetic.generate(700, n_users=25, n_items=30, days=4, seed=23, start=dt.date(2024, 10, 1))
    days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
    for day in days[:3]:
        for job in (items, user_history, ctr_samples):
            job.run(spark, cfg, lake, day)
    newest = days[2]
    before = {ds: lake.read_partition(ds, newest) for ds in KEYED_DATASETS}
    totals = {ds: lake.state_totals(ds, newest) for ds in KEYED_DATASETS}
    assert all(len(lake.state_days(ds, newest)) == 3 for ds in KEYED_DATASETS)
    assert lake.read_partition("features/user_history", newest)["needs_refresh"].sum() > 0

    done = consolidate_states(spark, lake, max_change_days=1)
    assert sorted(r["dataset"] for r in done) == sorted(KEYED_DATASETS) and {r["change_days"] for r in done} == {2}
    for ds in KEYED_DATASETS:
        assert lake.state_days(ds, newest) == [newest] and lake.day_kinds(ds)[newest] == FULL_DAY
        keys = list(STATE_ORDER[ds])
        a = before[ds].sort_values(keys).reset_index(drop=True)
        b = lake.read_partition(ds, newest)[list(before[ds].columns)].sort_values(keys).reset_index(drop=True)
        assert a.astype(str).equals(b.astype(str)), ds
        assert lake.state_totals(ds, newest) == totals[ds]
    assert consolidate_states(spark, lake, max_change_days=1) == []  # the chain is one day now

    # The next daily run builds on the full day and gives what the chain gave (a full build of the same day).
    items.run(spark, cfg, lake, days[3])
    summary = user_history.run(spark, cfg, lake, days[3])
    assert summary["incremental_from"] == newest.isoformat()
    ctr_samples.run(spark, cfg, lake, days[3])
    assert lake.state_days("features/user_history", days[3]) == [newest, days[3]]
    chained = {ds: lake.read_partition(ds, days[3]) for ds in KEYED_DATASETS}

    # A day written again after the consolidation read it: the consolidation's commit is refused, the write stays.
    lake_table = lake.load_table("features/ctr_samples")
    read_at = lake_table.current_snapshot().snapshot_id
    rewritten = lake.read_day_rows("features/ctr_samples", days[3])
    lake.write_partition(rewritten, "features/ctr_samples", days[3], changes_only=True)
    stale = spark.table(f"{lake.catalog_name}.features.ctr_samples").where(F.col("dt") == F.lit(days[3])).drop("dt")
    with pytest.raises(Exception, match="(?i)conflict"):
        write_partition(stale.limit(1), lake, "features/ctr_samples", days[3], changes_only=True,
                        unchanged_since=read_at)
    assert len(lake.read_day_rows("features/ctr_samples", days[3])) == len(rewritten)
    assert consolidate_state(spark, lake, "features/ctr_samples", 5) is None
    _assert_state_equals_a_full_build(spark, cfg, lake, days[3], chained, days[:3])
