"""Landing (the Spark job spark_jobs/landing.py, on the tests' classic session) and the raw gate: good days,
no-new-data days, and every kind of bad input."""

from __future__ import annotations

import datetime as dt
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reki_core.datasets.schema import day_bounds
from reki_core.landing import LandingError, land, run_raw_gate
from reki_core.quality.gx import GateError
from reki_core.storage.lake import Lake
from tests.conftest import make_config

DAY = dt.date(2024, 1, 2)
T0 = day_bounds(DAY)[0]


@pytest.fixture(autouse=True)
def _on_the_spark_session(spark):
    """`land` and `run_raw_gate` run on the active session: the tests' one."""
    yield spark


@pytest.fixture
def files_cfg(tmp_path):
    """A scenario whose upstream drops files in incoming/ (no replay), starting at DAY."""
    return make_config(tmp_path, scenario="books", REKI__SCENARIO_OVERRIDES__SOURCE__KIND="files",
                       REKI__SCENARIO_OVERRIDES__SOURCE__START_DATE=DAY.isoformat())


def good_interactions(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [f"u{i % 2}" for i in range(n)], "item_id": [f"i{i}" for i in range(n)],
                         "rating": pd.array([1 + i % 5 for i in range(n)], dtype="int32"),
                         "ts": pd.array([T0 + 60 * i for i in range(n)], dtype="int64")})


def deliver(lake: Lake, what: str, day: dt.date, df: pd.DataFrame | None = None, raw: bytes | None = None,
            name: str = "part.parquet") -> str:
    folder = lake.partition_path(f"incoming/{what}", day)
    lake.fs.makedirs(folder, exist_ok=True)
    path = f"{folder}/{name}"
    if raw is not None:
        with open(path, "wb") as fh:
            fh.write(raw)
    else:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def deliver_entities(lake: Lake, day: dt.date) -> None:
    deliver(lake, "users", day, pd.DataFrame({"user_id": ["u0", "u1"], "age": [30, 41], "gender": ["F", "M"],
                                              "occupation": ["writer", "other"], "zip_code": ["1", "2"]}))
    deliver(lake, "items", day, pd.DataFrame({"item_id": [f"i{i}" for i in range(6)],
                                              "title": [f"Book {i}" for i in range(6)],
                                              "year": [2000 + i for i in range(6)],
                                              "genres": [["Drama"]] * 6}))


def test_good_day_lands_and_passes_the_gate(files_cfg):
    lake = Lake(files_cfg.lake_uri)
    deliver(lake, "interactions", DAY, good_interactions())
    deliver_entities(lake, DAY)
    result = land(files_cfg, DAY)
    assert result["rows"] == 4 and result["rejected"] == 0 and result["initial_load"]
    landed = lake.read_partition("raw/interactions", DAY)
    assert list(landed.columns) == ["user_id", "item_id", "rating", "ts"]
    assert str(landed["rating"].dtype) == "int32"
    gate = run_raw_gate(files_cfg, DAY)
    assert gate["success"] and gate["rows"] == 4


def test_day_without_interactions_is_no_new_data(files_cfg):
    lake = Lake(files_cfg.lake_uri)
    deliver(lake, "interactions", DAY, good_interactions().iloc[:0])
    deliver_entities(lake, DAY)
    assert land(files_cfg, DAY)["no_new_data"] is True
    assert run_raw_gate(files_cfg, DAY)["no_new_data"] is True


def _expect_error(cfg, df=None, raw=None) -> str:
    lake = Lake(cfg.lake_uri)
    path = deliver(lake, "interactions", DAY, df, raw)
    deliver_entities(lake, DAY)
    with pytest.raises(LandingError) as err:
        land(cfg, DAY)
    assert path in str(err.value), "the error must name the file"
    assert not lake.has_partition("raw/interactions", DAY), "bad input must not land"
    return str(err.value)


@pytest.mark.parametrize(
    "mutate, column, rule",
    [
        (lambda d: d.drop(columns=["rating"]), "rating", "schema"),
        (lambda d: d.assign(device="tv"), "device", "schema"),
        (lambda d: d.assign(rating=["five"] * len(d)), "rating", "type"),
        (lambda d: d.assign(rating=pd.array([7, 1, 2, 3], dtype="int32")), "rating", "in_range"),
        (lambda d: d.assign(user_id=[None, "u1", "u0", "u1"]), "user_id", "not_null"),
        (lambda d: pd.concat([d, d.iloc[:1]], ignore_index=True), "user_id,item_id,ts", "unique"),
        (lambda d: d.assign(ts=d["ts"] + 86_400), "ts", "in_range"),
    ],
    ids=["missing-column", "extra-column", "wrong-type", "rating-7", "null-id", "duplicates", "ts-outside-day"],
)
def test_bad_input_names_file_column_rule(files_cfg, mutate, column, rule):
    message = _expect_error(files_cfg, df=mutate(good_interactions()))
    assert f"column '{column}'" in message
    assert f"rule '{rule}" in message


def test_empty_file_is_refused(files_cfg):
    assert "empty file" in _expect_error(files_cfg, raw=b"")


def test_unreadable_parquet_is_refused(files_cfg):
    assert "not readable as Parquet" in _expect_error(files_cfg, raw=b"PAR1 this is not parquet")


def test_quarantine_policy_keeps_good_rows_and_records_reasons(tmp_path):
    cfg = make_config(tmp_path, scenario="books", REKI__SCENARIO_OVERRIDES__SOURCE__KIND="files",
                      REKI__SCENARIO_OVERRIDES__SOURCE__START_DATE=DAY.isoformat(),
                      REKI__QUALITY__RAW_BAD_ROWS_POLICY="quarantine", REKI__QUALITY__RAW_MAX_REJECTED_SHARE="0.5")
    lake = Lake(cfg.lake_uri)
    bad = good_interactions().assign(rating=pd.array([7, 1, 2, 3], dtype="int32"))
    bad = pd.concat([bad, bad.iloc[[1]]], ignore_index=True)  # one duplicate too
    deliver(lake, "interactions", DAY, bad)
    deliver_entities(lake, DAY)
    result = land(cfg, DAY)
    assert result["rows"] == 3 and result["rejected"] == 2
    rejected = lake.read_partition("raw/_rejected", DAY)
    assert sorted(rejected["_reason"]) == ["rating:in_range", "user_id,item_id,ts:unique"]
    assert run_raw_gate(cfg, DAY)["success"]


def quarantine_cfg(tmp_path, **overrides):
    return make_config(tmp_path, scenario="books", REKI__SCENARIO_OVERRIDES__SOURCE__KIND="files",
                       REKI__SCENARIO_OVERRIDES__SOURCE__START_DATE=DAY.isoformat(),
                       REKI__QUALITY__RAW_BAD_ROWS_POLICY="quarantine", **overrides)


def test_quarantine_stops_when_most_rows_are_rejected(tmp_path):
    """Timestamps in milliseconds (an upstream format change) reject every row: that is no day to land."""
    cfg = quarantine_cfg(tmp_path)
    message = _expect_error(cfg, df=good_interactions(10).assign(ts=lambda d: d["ts"] * 1000))
    assert "rule 'max_rejected_share'" in message and "10 of 10 rows rejected, more than the 20%" in message
    assert "column 'ts': rule 'in_range" in message  # and why the rows were rejected
    assert not Lake(cfg.lake_uri).has_partition("raw/_rejected", DAY)


def test_integer_ids_land_as_text_even_beside_a_null(tmp_path):
    """An integer id column with a null: the null row is quarantined, the others land as "7", not "7.0"."""
    cfg = quarantine_cfg(tmp_path, REKI__QUALITY__RAW_MAX_REJECTED_SHARE="0.5")
    lake = Lake(cfg.lake_uri)
    table = pa.table({"user_id": pa.array([7, None, 8, 7], pa.int64()), "item_id": pa.array([1, 2, 3, 4], pa.int64()),
                      "rating": pa.array([4, 4, 2, 5], pa.int32()), "ts": pa.array([T0, T0 + 1, T0 + 2, T0 + 3], pa.int64())})
    path = deliver(lake, "interactions", DAY, raw=b"")
    pq.write_table(table, path)
    deliver_entities(lake, DAY)
    assert land(cfg, DAY)["rejected"] == 1
    landed = lake.read_partition("raw/interactions", DAY)
    assert sorted(landed["user_id"]) == ["7", "7", "8"] and sorted(landed["item_id"]) == ["1", "3", "4"]
    assert lake.read_partition("raw/_rejected", DAY)["_reason"].tolist() == ["user_id:not_null"]


def test_an_integer_id_and_its_text_are_one_id(files_cfg):
    """Two deliveries of one row, ids as integers in one and as text in the other: a duplicate, named."""
    lake = Lake(files_cfg.lake_uri)
    as_text = pd.DataFrame({"user_id": ["7"], "item_id": ["1"], "rating": pd.array([4], dtype="int32"),
                            "ts": pd.array([T0], dtype="int64")})
    deliver(lake, "interactions", DAY, as_text, name="a.parquet")
    second = deliver(lake, "interactions", DAY, as_text.astype({"user_id": "int64", "item_id": "int64"}), name="b.parquet")
    deliver_entities(lake, DAY)
    with pytest.raises(LandingError) as err:
        land(files_cfg, DAY)
    assert f"{second}: column 'user_id,item_id,ts': rule 'unique'" in str(err.value)


def test_a_first_load_that_failed_part_way_is_redone_whole(files_cfg):
    """The first load stops at a bad day after landing the days before it; its retry lands every day."""
    lake = Lake(files_cfg.lake_uri)
    days = [DAY + dt.timedelta(days=n) for n in range(3)]
    for n, day in enumerate(days):
        deliver(lake, "interactions", day, good_interactions().assign(ts=lambda d, n=n: d["ts"] + 86_400 * n))
    bad = deliver(lake, "interactions", days[1], good_interactions().assign(rating=9, ts=lambda d: d["ts"] + 86_400))
    deliver_entities(lake, days[2])
    with pytest.raises(LandingError) as err:
        land(files_cfg, days[2])
    assert bad in str(err.value)
    assert lake.partitions("raw/interactions") == days[:1]  # landed before the bad day was met

    deliver(lake, "interactions", days[1], good_interactions().assign(ts=lambda d: d["ts"] + 86_400))  # fixed
    retry = land(files_cfg, days[2])
    assert retry["initial_load"] and retry["days_landed"] == 3 and retry["rows"] == 12
    assert lake.partitions("raw/interactions") == days
    assert land(files_cfg, days[2])["days_landed"] == 1  # done: a re-run lands its own day only


def _count_file_reads(monkeypatch) -> list[str]:
    """The files landing reads one by one (the plan-per-file read that names a bad file)."""
    from spark_jobs import landing as job

    reads, read_one = [], job.read_delivery
    monkeypatch.setattr(job, "read_delivery", lambda spark, lake, path, *a: reads.append(path) or read_one(spark, lake, path, *a))
    return reads


def test_a_first_load_of_good_days_reads_every_file_in_one_scan(quarantine_day_cfg, monkeypatch):
    """Five good days, two files on one of them (one named with a space), a quarantined row: no file is read on its
    own, and every row is attributed to its file and day, as the file-by-file read would."""
    cfg = quarantine_day_cfg
    lake = Lake(cfg.lake_uri)
    days = [DAY + dt.timedelta(days=n) for n in range(5)]
    for n, day in enumerate(days):
        deliver(lake, "interactions", day, good_interactions(3 + n).assign(ts=lambda d, n=n: d["ts"] + 86_400 * n))
    spaced = deliver(lake, "interactions", days[2], good_interactions(2).assign(
        item_id=["j0", "j1"], rating=pd.array([4, 9], dtype="int32"), ts=lambda d: d["ts"] + 2 * 86_400),
        name="late part.parquet")
    deliver_entities(lake, days[-1])
    reads = _count_file_reads(monkeypatch)
    result = land(cfg, days[-1])
    assert reads == [f"{lake.partition_path('incoming/users', days[-1])}/part.parquet",
                     f"{lake.partition_path('incoming/items', days[-1])}/part.parquet"]  # the snapshots only
    assert result["days_landed"] == 5 and result["rows"] == 3 + 4 + 5 + 6 + 7 + 1 and result["rejected"] == 1
    assert [len(lake.read_partition("raw/interactions", d)) for d in days] == [3, 4, 6, 6, 7]
    rejected = lake.read_partition("raw/_rejected", days[2])
    assert rejected[["_source_file", "_reason", "item_id"]].values.tolist() == [[spaced, "rating:in_range", "j1"]]


@pytest.fixture
def quarantine_day_cfg(tmp_path):
    return quarantine_cfg(tmp_path, REKI__QUALITY__RAW_MAX_REJECTED_SHARE="0.5")


@pytest.mark.parametrize("lacks", ["rows", "no-rows"])
def test_a_file_without_a_column_among_good_days_is_named_and_the_days_before_it_land(files_cfg, monkeypatch, lacks):
    """Files that merge into the expected columns can still hide one that lacks a column (its rows read as nulls) or
    that has no rows: the landing falls back to reading file by file and names it, as for a single day."""
    lake = Lake(files_cfg.lake_uri)
    days = [DAY + dt.timedelta(days=n) for n in range(3)]
    for n, day in enumerate(days):
        deliver(lake, "interactions", day, good_interactions().assign(ts=lambda d, n=n: d["ts"] + 86_400 * n))
    short = good_interactions(0 if lacks == "no-rows" else 2).drop(columns=["rating"]).assign(ts=lambda d: d["ts"] + 86_400)
    bad = deliver(lake, "interactions", days[1], short, name="second.parquet")
    deliver_entities(lake, days[2])
    reads = _count_file_reads(monkeypatch)
    with pytest.raises(LandingError) as err:
        land(files_cfg, days[2])
    assert f"{bad}: column 'rating': rule 'schema': required column is missing" in str(err.value)
    assert bad in reads
    assert lake.partitions("raw/interactions") == days[:1]


def test_days_a_stopped_scheduler_skipped_land_with_the_next_run(files_cfg):
    """DAY landed; the runs of DAY+1 and DAY+2 never happened. The run of DAY+3 lands all three days, and
    stops, naming the folder, at a day whose delivery never came; its retry goes on from there."""
    lake = Lake(files_cfg.lake_uri)
    days = [DAY + dt.timedelta(days=n) for n in range(4)]
    deliver(lake, "interactions", DAY, good_interactions())
    deliver_entities(lake, DAY)
    land(files_cfg, DAY)
    deliver(lake, "interactions", days[1], good_interactions().assign(ts=lambda d: d["ts"] + 86_400))
    deliver(lake, "interactions", days[3], good_interactions(2).assign(ts=lambda d: d["ts"] + 3 * 86_400))
    deliver_entities(lake, days[3])
    with pytest.raises(LandingError) as err:
        land(files_cfg, days[3])
    assert f"incoming/interactions/dt={days[2].isoformat()}" in str(err.value) and "no delivery" in str(err.value)
    assert lake.partitions("raw/interactions") == days[:2]

    deliver(lake, "interactions", days[2], good_interactions(3).assign(ts=lambda d: d["ts"] + 2 * 86_400))
    retry = land(files_cfg, days[3])
    assert retry["days_landed"] == 2 and retry["missed_days_landed"] == 1 and retry["rows"] == 5
    assert lake.partitions("raw/interactions") == days
    assert land(files_cfg, days[3])["days_landed"] == 1  # a re-run of a date lands that date only


def test_identical_redelivery_is_read_once(files_cfg):
    lake = Lake(files_cfg.lake_uri)
    deliver(lake, "interactions", DAY, good_interactions(), name="a.parquet")
    deliver(lake, "interactions", DAY, good_interactions(), name="b.parquet")
    deliver_entities(lake, DAY)
    result = land(files_cfg, DAY)
    assert result["rows"] == 4 and result["duplicate_deliveries"] == 1


def test_rerun_overwrites_only_its_date(files_cfg):
    lake = Lake(files_cfg.lake_uri)
    next_day = DAY + dt.timedelta(days=1)
    deliver(lake, "interactions", DAY, good_interactions())
    deliver_entities(lake, DAY)
    land(files_cfg, DAY)
    nd = good_interactions(2).assign(ts=lambda d: d["ts"] + 86_400)
    deliver(lake, "interactions", next_day, nd)
    deliver_entities(lake, next_day)
    assert land(files_cfg, next_day)["days_landed"] == 1
    before = lake.read_partition("raw/interactions", DAY)
    assert land(files_cfg, next_day)["rows"] == 2
    pd.testing.assert_frame_equal(lake.read_partition("raw/interactions", DAY), before)
    assert len(lake.read_partition("raw/interactions", next_day)) == 2


def test_raw_gate_catches_a_corrupted_landed_partition(files_cfg):
    lake = Lake(files_cfg.lake_uri)
    deliver(lake, "interactions", DAY, good_interactions())
    deliver_entities(lake, DAY)
    land(files_cfg, DAY)
    tampered = lake.read_partition("raw/interactions", DAY)
    tampered.loc[0, "rating"] = 9
    lake.write_partition(tampered, "raw/interactions", DAY)
    with pytest.raises(GateError) as err:
        run_raw_gate(files_cfg, DAY)
    assert "rating" in str(err.value) and "1 unexpected" in str(err.value)


def test_movielens_initial_load_then_daily(cfg, ml100k_dir):
    """The embedded default: an empty lake loads all history up to dt; the next run lands one day."""
    first = dt.date(1997, 9, 25)
    result = land(cfg, first)
    assert result["initial_load"] and result["days_landed"] == 6
    lake = Lake(cfg.lake_uri)
    assert lake.partitions("raw/interactions")[0] == dt.date(1997, 9, 20)
    nxt = land(cfg, first + dt.timedelta(days=1))
    assert not nxt["initial_load"] and nxt["days_landed"] == 1
    users = lake.read_partition("raw/users", first + dt.timedelta(days=1))
    assert len(users) >= result["users"]


def test_a_write_whose_commit_fails_leaves_the_previous_day(tmp_path, monkeypatch):
    """The new day's files are written but its catalog commit fails: readers still see the previous rows."""
    lake = Lake(str(tmp_path / "lake"))
    lake.write_partition(good_interactions(), "raw/interactions", DAY)
    before = lake.read_partition("raw/interactions", DAY)

    def commit_table(*args, **kwargs):
        raise OSError("simulated failure committing the new day")

    monkeypatch.setattr(lake.catalog, "commit_table", commit_table)
    with pytest.raises(OSError, match="simulated failure"):
        lake.write_partition(good_interactions(2), "raw/interactions", DAY)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(Lake(str(tmp_path / "lake")).read_partition("raw/interactions", DAY), before)


def test_a_bad_snapshot_names_file_column_and_rule_and_does_not_land(files_cfg):
    lake = Lake(files_cfg.lake_uri)
    deliver(lake, "interactions", DAY, good_interactions())
    deliver_entities(lake, DAY)
    users = lake.partition_path("incoming/users", DAY) + "/part.parquet"
    pq.write_table(pa.table({"user_id": ["u0", "u0", "u1"], "age": pa.array([30, 200, 41], pa.int64()),
                             "gender": ["F", "F", "M"], "occupation": ["a", "b", "c"], "zip_code": ["1", "2", "3"]}),
                   users)
    with pytest.raises(LandingError) as err:
        land(files_cfg, DAY)
    message = str(err.value)
    assert f"{users}: column 'user_id': rule 'unique': expect_column_values_to_be_unique" in message, message
    assert f"{users}: column 'age': rule 'in_range': " in message and "2 unexpected" in message, message
    assert not lake.has_partition("raw/users", DAY) and not lake.has_partition("raw/items", DAY)


def test_raw_gate_checks_the_whole_snapshot_in_spark(files_cfg):
    """A landed users snapshot that lost its uniqueness: GX's suite on the Spark DataFrame fails the gate."""
    lake = Lake(files_cfg.lake_uri)
    deliver(lake, "interactions", DAY, good_interactions())
    deliver_entities(lake, DAY)
    land(files_cfg, DAY)
    users = lake.read_partition("raw/users", DAY)
    lake.write_partition(pd.concat([users, users.iloc[:1]], ignore_index=True), "raw/users", DAY)
    with pytest.raises(GateError) as err:
        run_raw_gate(files_cfg, DAY)
    assert "raw/users/dt=2024-01-02" in str(err.value), str(err.value)
    assert "expect_column_values_to_be_unique column 'user_id'" in str(err.value) and "2 unexpected" in str(err.value)
    assert "raw/items" not in str(err.value).split(":\n", 1)[1]


def test_landing_as_a_connect_client_lands_what_the_classic_session_lands(spark, spark_connect, tmp_path):
    """The DAG runs landing as a Spark Connect task: the same rows, rejects and record as on a classic session (the
    snapshots' suites run on Connect DataFrames there)."""
    from spark_jobs.common import jobs_named, run_jobs
    from tests.spark.test_two_engines import client

    env = {"REKI__SCENARIO": "books", "REKI__SCENARIO_OVERRIDES__SOURCE__KIND": "files",
           "REKI__SCENARIO_OVERRIDES__SOURCE__START_DATE": DAY.isoformat(),
           "REKI__QUALITY__RAW_BAD_ROWS_POLICY": "quarantine", "REKI__QUALITY__RAW_MAX_REJECTED_SHARE": "0.5"}
    results, lakes = [], []
    for root in (tmp_path / "classic", tmp_path / "connect"):
        cfg = make_config(root, **env)
        lake = Lake(cfg.lake_uri)
        for n in range(2):
            day_rows = good_interactions(6).assign(ts=lambda d, n=n: d["ts"] + 86_400 * n)
            day_rows.loc[1, "rating"] = 9
            deliver(lake, "interactions", DAY + dt.timedelta(days=n), day_rows)
            deliver(lake, "interactions", DAY + dt.timedelta(days=n), day_rows, name="resent.parquet")
        deliver_entities(lake, DAY + dt.timedelta(days=1))
        lakes.append(lake)
        last = (DAY + dt.timedelta(days=1)).isoformat()
        if root.name == "classic":
            results.append(json.loads(json.dumps(run_jobs(spark, jobs_named(["landing"]), cfg, lake,
                                                          DAY + dt.timedelta(days=1))["land"], default=str)))
        else:
            connect_env = {**env, "REKI__PATHS__LAKE_URI": cfg.lake_uri, "REKI__PATHS__STATE_DIR": str(root / "state")}
            [result] = client("run", spark_connect, connect_env, jobs=[["landing"]], days=[last])["results"]
            results.append(result["land"])
    ignore = {"seconds", "started_at", "lake"}
    classic, connect = ({k: json.loads(json.dumps(v).replace(str(tmp_path / name), "ROOT")) for k, v in r.items()
                         if k not in ignore} for r, name in zip(results, ("classic", "connect")))
    assert classic == connect and classic["rejected"] == 2 and classic["duplicate_deliveries"] == 2, (classic, connect)
    for dataset in ("raw/interactions", "raw/_rejected", "raw/users", "raw/items"):
        assert lakes[0].partitions(dataset) == lakes[1].partitions(dataset), dataset
        for day in lakes[0].partitions(dataset):
            a, b = (lk.read_partition(dataset, day) for lk in lakes)
            if "_source_file" in a:  # each lake names its own files
                a["_source_file"], b["_source_file"] = a["_source_file"].str.rsplit("/", n=1).str[-1], \
                    b["_source_file"].str.rsplit("/", n=1).str[-1]
            if "genres" in a:
                a["genres"], b["genres"] = a["genres"].map(list), b["genres"].map(list)
            pd.testing.assert_frame_equal(a, b)
