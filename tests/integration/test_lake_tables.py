"""The lake's foundation (issue 27): an Iceberg table in the lake bucket on a real SeaweedFS, written by a real Spark
Connect server through s3a:// (the writer identity from its environment), tracked by the JDBC catalog in its own
SQLite file, and read by pyiceberg with the read-only identity. A re-run of a day replaces exactly that day."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path

import pytest

from tests.conftest import make_config, serve_seaweed, serve_spark_connect

pytestmark = [pytest.mark.integration]

LAKE_BUCKET = "reki-test-lake"
TABLE = "features.daily_probe"
D1, D2 = dt.date(1997, 9, 22), dt.date(1997, 9, 23)


@pytest.fixture(scope="module")
def lake_stack(tmp_path_factory):
    """SeaweedFS (published and lake buckets) and a Connect server sharing one state dir (its identities)."""
    root = tmp_path_factory.mktemp("lake-tables")
    seaweed_run = serve_seaweed(root / "state", lake_bucket=LAKE_BUCKET)
    s3 = next(seaweed_run)
    try:
        env = {"REKI__OBJECT_STORE__ENDPOINT_URL": s3.endpoint_url, "REKI__LAKE__BUCKET": LAKE_BUCKET}
        # -Dspark.testing: Iceberg's own switch that lets remove_orphan_files take files seconds old (it refuses an
        # age under 24 h otherwise, and a session cannot set it); only this module's server has it.
        java_options = make_config(root).spark.driver_java_options + " -Dspark.testing=true"
        connect_run = serve_spark_connect(root, REKI__SPARK__CONNECT_JAVA_OPTIONS=java_options, **env)
        connect = next(connect_run)
        try:
            yield root, s3, connect, make_config(root, REKI__SPARK__CONNECT_URL=connect.url, **env)
        finally:
            connect_run.close()
    finally:
        s3.server.stop()  # also when the Connect server did not start


SCHEMA = "user_id BIGINT, n_events INT, dt DATE"


def _create_day_table(spark, cfg, name: str) -> None:
    """A table of (user_id, n_events) partitioned by dt, in the lake catalog's `features` namespace."""
    spark.sql(f"CREATE NAMESPACE IF NOT EXISTS {cfg.lake.catalog}.features")
    spark.sql(f"CREATE TABLE {name} ({SCHEMA}) USING iceberg PARTITIONED BY (dt)")


def _rows(frame) -> list[tuple]:
    return sorted((r["user_id"], r["n_events"], r["dt"]) for r in frame.collect())


def test_spark_writes_days_and_the_reader_sees_them(lake_stack, monkeypatch):
    from reki_core.spark import connect_client
    from reki_core.storage.object_store import make_s3_client
    from reki_core.storage.s3_access import ObjectStoreError
    from reki_core.storage.tables import LakeTables, lake_access, sqlite_catalog_file

    root, s3, connect, cfg = lake_stack
    monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", connect.token)
    schema = SCHEMA
    day1 = [(1, 3, D1), (2, 1, D1), (3, 7, D1)]
    day2_first = [(1, 2, D2), (4, 5, D2)]
    day2_rerun = [(1, 4, D2), (5, 1, D2), (6, 2, D2)]
    name = f"{cfg.lake.catalog}.{TABLE}"
    with connect_client(cfg) as spark:
        _create_day_table(spark, cfg, name)
        spark.createDataFrame(day1, schema).writeTo(name).append()
        spark.createDataFrame(day2_first, schema).writeTo(name).append()
        # A re-run of D2 (twice: the second changes nothing) replaces D2's rows and only them.
        spark.createDataFrame(day2_rerun, schema).writeTo(name).overwritePartitions()
        spark.createDataFrame(day2_rerun, schema).writeTo(name).overwritePartitions()
        assert _rows(spark.table(name)) == sorted(day1 + day2_rerun)
        snapshots = [(r["snapshot_id"], r["operation"]) for r in
                     spark.sql(f"SELECT snapshot_id, operation FROM {name}.snapshots ORDER BY committed_at").collect()]
        location = spark.sql(f"DESCRIBE TABLE EXTENDED {name}").where("col_name = 'Location'").first()["data_type"]
    assert [op for _, op in snapshots] == ["append", "append", "overwrite", "overwrite"]
    assert location == f"s3a://{LAKE_BUCKET}/{cfg.lake.warehouse_prefix}/features/daily_probe"

    # pyiceberg, as the read-only identity, on the same catalog database: same snapshots, same rows, time travel.
    reader = LakeTables(cfg, lake_access(cfg, access_key=s3.reader_key, secret_key=s3.reader_secret))
    table = reader.load(TABLE)
    assert [s.snapshot_id for s in table.snapshots()] == [sid for sid, _ in snapshots]
    assert table.current_snapshot().snapshot_id == snapshots[-1][0]
    assert [spec.name for spec in table.spec().fields] == ["dt"]
    current = reader.read(TABLE).to_pylist()
    assert sorted((r["user_id"], r["n_events"], r["dt"]) for r in current) == sorted(day1 + day2_rerun)
    before_rerun = reader.read(TABLE, row_filter=f"dt = '{D2}'", snapshot_id=snapshots[1][0]).to_pylist()
    assert sorted((r["user_id"], r["n_events"], r["dt"]) for r in before_rerun) == sorted(day2_first)

    # The reader identity cannot write: its upload is refused before any commit.
    import pyarrow as pa

    with pytest.raises(OSError, match="ACCESS_DENIED"):
        table.append(pa.table({"user_id": [9], "n_events": [1], "dt": [D2]}, schema=table.schema().as_arrow()))
    assert reader.load(TABLE).current_snapshot().snapshot_id == snapshots[-1][0]

    # Every byte of the table is in the lake bucket: data files per day partition and Iceberg metadata ...
    keys = [o["Key"] for o in make_s3_client(s3.endpoint_url, s3.writer_key, s3.writer_secret)
            .list_objects_v2(Bucket=LAKE_BUCKET, Prefix=f"{cfg.lake.warehouse_prefix}/features/daily_probe/")
            .get("Contents", [])]
    assert any(f"/data/dt={D1}/" in k and k.endswith(".parquet") for k in keys), keys
    assert any(f"/data/dt={D2}/" in k and k.endswith(".parquet") for k in keys), keys
    assert any(k.endswith(".metadata.json") for k in keys), keys
    # ... and none on the local disk: the only local file is the catalog's SQLite database (pointers, no rows).
    local = [p for p in root.rglob("*")
             if p.is_file() and (p.suffix in (".parquet", ".avro") or p.name.endswith(".metadata.json"))]
    assert local == [], local
    assert sqlite_catalog_file(cfg).is_file()
    assert not Path(cfg.lake_uri).exists() or not any(Path(cfg.lake_uri).rglob("*.parquet"))

    # A wrong secret fails clearly, naming the bucket and the identity.
    wrong = LakeTables(cfg, lake_access(cfg, access_key=s3.reader_key, secret_key="not-the-secret"))
    with pytest.raises(ObjectStoreError) as failure:
        wrong.load(TABLE)
    message = str(failure.value)
    assert f"s3://{LAKE_BUCKET}" in message and f"identity '{s3.reader_key}'" in message, message
    assert "not-the-secret" not in message


def test_maintenance_compacts_expires_and_removes_orphans(lake_stack, monkeypatch):
    """Each of the three steps really happens: six one-file commits become one file, the five snapshots before the
    compaction expire with their files, and a file no snapshot references is deleted; the rows stay the same."""
    import datetime as dtm

    from reki_core.spark import connect_client
    from reki_core.storage.lake import TARGET_FILE_SIZE
    from reki_core.storage.maintenance import lake_table_names, maintain_lake_via_connect, maintain_table
    from reki_core.storage.object_store import make_s3_client

    root, s3, connect, cfg = lake_stack
    monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", connect.token)
    name = f"{cfg.lake.catalog}.features.maintenance_probe"
    prefix = f"{cfg.lake.warehouse_prefix}/features/maintenance_probe/"
    client = make_s3_client(s3.endpoint_url, s3.writer_key, s3.writer_secret)
    orphan = f"{prefix}data/dt={D1}/00000-0-orphan-of-a-killed-write.parquet"
    with connect_client(cfg) as spark:
        _create_day_table(spark, cfg, name)
        rows = [(i, i * 10, D1) for i in range(6)]
        for row in rows:  # a commit per row: six small files in one partition
            spark.createDataFrame([row], SCHEMA).coalesce(1).writeTo(name).append()
        files_before = {r["file_path"] for r in spark.sql(f"SELECT file_path FROM {name}.files").collect()}
        assert len(files_before) == 6 and spark.sql(f"SELECT * FROM {name}.snapshots").count() == 6
        client.put_object(Bucket=LAKE_BUCKET, Key=orphan, Body=b"bytes no snapshot references")

        policy = cfg.lake.maintenance.model_copy(update={
            "snapshot_retention_days": 0, "retain_last": 1, "orphan_age_hours": 0, "min_input_files": 2})
        now = dtm.datetime.now(dtm.UTC) + dtm.timedelta(seconds=2)
        result = maintain_table(spark, cfg.lake.catalog, "features.maintenance_probe", policy, now)

        files_after = {r["file_path"] for r in spark.sql(f"SELECT file_path FROM {name}.files").collect()}
        snapshots_after = spark.sql(f"SELECT operation FROM {name}.snapshots").collect()
        properties = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES {name}").collect()}
        metadata_versions = spark.sql(f"SELECT * FROM {name}.metadata_log_entries").count()
        maintain_table(spark, cfg.lake.catalog, "features.maintenance_probe", policy, now)  # nothing left to do
        metadata_versions_again = spark.sql(f"SELECT * FROM {name}.metadata_log_entries").count()
        assert sorted(tuple(r) for r in spark.table(name).collect()) == sorted(rows)
        assert "features.maintenance_probe" in lake_table_names(spark, cfg.lake.catalog)
    assert (result["rewritten_data_files"], result["added_data_files"]) == (6, 1), result
    assert properties[TARGET_FILE_SIZE] == str(cfg.lake.target_file_mb * 2**20)  # set on a table created before it
    assert metadata_versions_again == metadata_versions  # a second run commits no metadata
    assert len(files_after) == 1 and not files_after & files_before
    assert [r["operation"] for r in snapshots_after] == ["replace"], snapshots_after
    assert result["expired_snapshots_files"]["deleted_data_files_count"] == 6, result
    assert [p.endswith(orphan) for p in result["removed_orphan_files"]] == [True], result
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=LAKE_BUCKET, Prefix=prefix).get("Contents", [])}
    assert orphan not in keys
    assert not any(path.split(f"{LAKE_BUCKET}/", 1)[1] in keys for path in files_before)  # expired files deleted

    # The DAG's task, with the config's retention (72 h orphans, 7 days of snapshots): every table is visited and
    # nothing young is touched.
    summary = maintain_lake_via_connect(cfg, connect.url, dtm.datetime.now(dtm.UTC), log=lambda line: None)
    assert {t["table"] for t in summary["tables"]} >= {"features.maintenance_probe", "features.daily_probe"}
    assert summary["removed_orphan_files"] == 0


@pytest.mark.faults
def test_backfill_and_daily_run_commit_to_one_table_at_once(lake_stack, monkeypatch):
    """Two writers (a backfill of D1, the daily run of D2) replace their own day of one table at the same time, three
    times each: the catalog's compare-and-set serialises the commits, Iceberg retries the loser, both days end
    complete with their last rows."""
    import threading

    from reki_core.spark import connect_client

    root, s3, connect, cfg = lake_stack
    monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", connect.token)
    name = f"{cfg.lake.catalog}.features.concurrent_probe"
    schema = SCHEMA
    with connect_client(cfg) as spark:
        _create_day_table(spark, cfg, name)
    failures: list[BaseException] = []

    def writer(day: dt.date) -> None:
        try:
            with connect_client(cfg) as spark:
                for attempt in range(3):
                    rows = [(u, attempt, day) for u in range(50)]
                    spark.createDataFrame(rows, schema).writeTo(name).overwritePartitions()
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(day,)) for day in (D1, D2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    with connect_client(cfg) as spark:
        by_day = {r["dt"]: (r["n"], r["attempts"]) for r in spark.sql(
            f"SELECT dt, count(*) AS n, collect_set(n_events) AS attempts FROM {name} GROUP BY dt").collect()}
        commits = spark.sql(f"SELECT * FROM {name}.snapshots").count()
    assert by_day == {D1: (50, [2]), D2: (50, [2])}, by_day
    assert commits == 6


@pytest.mark.faults
def test_store_killed_during_a_write_keeps_the_previous_snapshot(lake_stack, monkeypatch):
    """SeaweedFS dies (SIGKILL) once the write's first data file is in the bucket: the write fails within seconds
    (capped s3a retries), the table still reads its previous snapshot after the store is back, and the retry
    completes. What the dead write left is an orphan, which maintenance removes."""
    import os
    import signal
    import threading
    import time

    from reki_core.spark import connect_client
    from reki_core.storage.maintenance import maintain_table
    from reki_core.storage.object_store import make_s3_client

    root, s3, connect, cfg = lake_stack
    monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", connect.token)
    name = f"{cfg.lake.catalog}.features.killed_store_probe"
    prefix = f"{cfg.lake.warehouse_prefix}/features/killed_store_probe/data/dt={D2}/"
    client = make_s3_client(s3.endpoint_url, s3.writer_key, s3.writer_secret)
    day2 = f"SELECT id AS user_id, CAST(id % 7 AS INT) AS n_events, DATE'{D2}' AS dt FROM range(400000)"
    with connect_client(cfg) as spark:
        _create_day_table(spark, cfg, name)
        spark.sql(f"SELECT id AS user_id, 1 AS n_events, DATE'{D1}' AS dt FROM range(10)").writeTo(name).append()
        before = spark.sql(f"SELECT snapshot_id FROM {name}.snapshots").first()["snapshot_id"]

    outcome: dict = {}

    def write_day2() -> None:
        try:
            # 200 files, one per task, one task at a time (local[1]): seconds of writing between the first file and
            # the commit even when this process is starved. distribution-mode none keeps them 200: Iceberg's default
            # (hash by partition) shuffles one day's rows into one task, so its one file came just before the commit
            # and a slow machine's kill could fall after it (CI, stop 47).
            with connect_client(cfg) as spark:
                spark.sql(day2).repartition(200).writeTo(name).option("distribution-mode", "none").overwritePartitions()
            outcome["result"] = "committed"
        except Exception as exc:
            outcome["result"], outcome["error"] = "failed", exc
        outcome["ended"] = time.monotonic()

    writing = threading.Thread(target=write_day2)
    writing.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not client.list_objects_v2(Bucket=LAKE_BUCKET, Prefix=prefix).get("KeyCount"):
        time.sleep(0.05)
    os.killpg(s3.server.pid(), signal.SIGKILL)
    killed = time.monotonic()
    writing.join(timeout=300)
    try:
        assert outcome.get("result") == "failed", outcome
        assert outcome["ended"] - killed < 120, "a dead store must fail the write in seconds, not minutes"
    finally:
        s3.server.start()  # the same data folder: the store comes back with what it held
    with connect_client(cfg) as spark:
        spark.sql(f"REFRESH TABLE {name}")
        assert spark.sql(f"SELECT snapshot_id FROM {name}.snapshots").collect()[-1]["snapshot_id"] == before
        assert spark.table(name).count() == 10
        left = {f"s3a://{LAKE_BUCKET}/{o['Key']}" for o in
                client.list_objects_v2(Bucket=LAKE_BUCKET, Prefix=prefix).get("Contents", [])}
        assert left, "the dead write left no file: the store was killed after the write ended"
        spark.sql(day2).repartition(4).writeTo(name).overwritePartitions()  # the retry
        assert spark.table(name).where(f"dt = DATE'{D2}'").count() == 400000
        policy = cfg.lake.maintenance.model_copy(update={"orphan_age_hours": 0, "min_input_files": 100})
        removed = maintain_table(spark, cfg.lake.catalog, "features.killed_store_probe", policy,
                                 dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2))["removed_orphan_files"]
        assert left <= set(removed), (left, removed)
        assert spark.table(name).count() == 400010


def test_a_pipeline_day_keeps_its_tables_in_the_store(lake_stack, monkeypatch, ml100k_dir, tmp_path):
    """The lake as `make run` has it (conf/reki.yaml): its root on the object store and its tables in the store's
    catalog. Landing, the Spark feature jobs (s3a, the server's identity), the feature gates and the prompts read and
    write tables whose files are in the lake bucket, and their documents (deliveries, run records, gate results) are
    objects there too: nothing of the lake is on the local disk. The read-only identity reads the tables and cannot
    write: a clear error names the bucket and the identity."""
    from reki_core.spark import connect_client
    from reki_core.storage.lake import Lake, lake_of
    from reki_core.storage.object_store import make_s3_client
    from reki_core.storage.s3_access import ObjectStoreError
    from reki_core.storage.tables import lake_access, s3fs_options, sqlite_catalog_file
    from tests.integration.pipeline_driver import run_day

    root, s3, connect, stack_cfg = lake_stack
    monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", connect.token)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.writer_key)  # the writer identity, as the stack's tasks get it
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.writer_secret)
    # The Connect server's config (its catalog database and warehouse), with the stages' tables in the store.
    # This test's own folder (nothing of the lake may land in it); the stack's state dir (the catalog file).
    cfg = make_config(tmp_path, REKI__PATHS__STATE_DIR=str(root / "state"), REKI__SPARK__CONNECT_URL=connect.url,
                      REKI__LAKE__TABLES_IN_STORE="true",
                      REKI__OBJECT_STORE__ENDPOINT_URL=s3.endpoint_url, REKI__LAKE__BUCKET=LAKE_BUCKET,
                      REKI__SPARK__SHUFFLE_PARTITIONS="2", REKI__PATHS__LAKE_URI=f"s3://{LAKE_BUCKET}/lake")
    with connect_client(cfg) as spark:
        run = run_day(cfg, D1, spark, until="prompts_gate")
    assert run.ran[-1] == "prompts_gate"

    lake = lake_of(cfg)
    assert lake.store is not None and lake.catalog_name == cfg.lake.catalog
    prompts = lake.read_partition("prompts", D1)
    assert len(prompts) > 0
    warehouse = cfg.lake.warehouse_prefix
    for dataset in ("raw/interactions", "features/items", "features/user_history", "features/ctr_samples", "prompts"):
        assert lake.load_table(dataset).location().startswith(f"s3a://{LAKE_BUCKET}/{warehouse}/"), dataset
    keys = [o["Key"] for page in make_s3_client(s3.endpoint_url, s3.writer_key, s3.writer_secret)
            .get_paginator("list_objects_v2").paginate(Bucket=LAKE_BUCKET, Prefix=f"{warehouse}/")
            for o in page.get("Contents", [])]
    for table in ("raw/interactions", "features/items", "features/user_history", "main/prompts"):
        assert any(k.startswith(f"{warehouse}/{table}/data/dt={D1}/") and k.endswith(".parquet") for k in keys), table
    documents = [o["Key"] for page in make_s3_client(s3.endpoint_url, s3.writer_key, s3.writer_secret)
                 .get_paginator("list_objects_v2").paginate(Bucket=LAKE_BUCKET, Prefix="lake/")
                 for o in page.get("Contents", [])]
    assert any(k.startswith(f"lake/_runs/dt={D1}/") and k.endswith("features_user_history.json") for k in documents)
    assert any(k.startswith("lake/incoming/") for k in documents), documents[:20]
    assert not list(tmp_path.rglob("*")), "lake data on the local disk"
    assert any(k.startswith(f"lake/_runs/dt={D1}/data_docs/") and k.endswith("index.html") for k in documents)
    assert sqlite_catalog_file(cfg).is_file()  # the catalog database: a per-host file beside the state, not the lake

    # The consumer's read-only identity reads the Spark-written table; its write is refused, clearly.
    reader_access = lake_access(cfg, access_key=s3.reader_key, secret_key=s3.reader_secret)
    reader = Lake(cfg.lake_uri, dataclasses.replace(lake.store, access=reader_access),
                  storage_options=s3fs_options(cfg, reader_access))
    items = reader.read_partition("features/items", D1)
    assert len(items) == len(lake.read_partition("features/items", D1)) > 0
    with pytest.raises(ObjectStoreError) as refused:
        reader.write_partition(items, "features/items", D2)
    message = str(refused.value)
    assert f"s3://{LAKE_BUCKET}" in message and f"identity '{s3.reader_key}'" in message, message
    assert "features/items/dt=1997-09-23" in message, message
    assert D2 not in lake.partitions("features/items")

    # A consumer's own pyiceberg reads features.user_history as the read-only identity, resolving the state of D1 as
    # docs/data_contracts.md says (each user's rows from the newest day that wrote them): the pipeline's own view.
    from reki_core.storage.tables import LakeTables

    history = LakeTables(cfg, reader_access).load("features.user_history")
    rows = history.scan(row_filter=f"dt <= '{D1.isoformat()}'", selected_fields=("user_id", "n_interactions",
                                                                                 "dt")).to_pandas()
    state = rows[rows["dt"] == rows.groupby("user_id")["dt"].transform("max")].set_index("user_id").sort_index()
    ours = lake.read_partition("features/user_history", D1, ["user_id", "n_interactions"]).set_index("user_id")
    assert len(state) == len(ours) > 0 and state["n_interactions"].equals(ours.sort_index()["n_interactions"])

    # The maintenance DAG's task visits the stages' tables too (their own catalog, registered on its session).
    from reki_core.storage.maintenance import maintain_lake_via_connect

    summary = maintain_lake_via_connect(cfg, connect.url, dt.datetime.now(dt.UTC), log=lambda line: None)
    visited = {(t["catalog"], t["table"]) for t in summary["tables"]}
    assert {(cfg.lake.catalog, "raw.interactions"), (cfg.lake.catalog, "features.items"),
            (cfg.lake.catalog, "main.prompts")} <= visited, visited
    assert len(lake.read_partition("prompts", D1)) == len(prompts)


@pytest.mark.faults
def test_a_spark_server_with_a_wrong_identity_fails_naming_the_bucket_and_the_identity(lake_stack, monkeypatch,
                                                                                        ml100k_dir):
    """A Connect server whose writer identity the store does not know (its own state's generated keys): a feature
    job on the store's tables fails with an error that names the bucket and whose identity it was, not a Java trace
    alone; the table keeps what it had."""
    from reki_core.landing import land
    from reki_core.spark import connect_client
    from reki_core.storage.lake import lake_of
    from reki_core.storage.s3_access import ObjectStoreError
    from spark_jobs.common import jobs_named, run_jobs

    root, s3, connect, _ = lake_stack
    env = {"REKI__OBJECT_STORE__ENDPOINT_URL": s3.endpoint_url, "REKI__LAKE__BUCKET": LAKE_BUCKET}
    stranger_run = serve_spark_connect(root / "stranger", **env)  # its state generates keys SeaweedFS never heard of
    stranger = next(stranger_run)
    try:
        monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", stranger.token)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.writer_key)  # the task itself is the right writer
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.writer_secret)
        cfg = make_config(root, REKI__SPARK__CONNECT_URL=stranger.url, REKI__LAKE__TABLES_IN_STORE="true",
                          REKI__SPARK__SHUFFLE_PARTITIONS="2", **env)
        day = dt.date(1997, 9, 24)
        monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", connect.token)
        with connect_client(cfg, connect.url) as spark:  # landing is a Spark job too: on the stack's own server
            land(cfg, day, spark)
        monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", stranger.token)
        lake = lake_of(cfg)
        with connect_client(cfg) as spark, pytest.raises(ObjectStoreError) as failure:
            started = time.monotonic()
            try:
                run_jobs(spark, jobs_named(["items"]), cfg, lake, day)
            finally:
                failed_after = time.monotonic() - started
    finally:
        stranger_run.close()
    message = str(failure.value)
    assert f"s3://{LAKE_BUCKET}" in message and "features_items" in message, message
    assert "the Spark server's identity" in message and "AWS_ACCESS_KEY_ID" in message, message
    # Iceberg's own retries of a metadata read take about 90 s: the check before the jobs fails in seconds.
    assert failed_after < 45, f"the refused identity failed the job only after {failed_after:.0f} s"
    assert day not in lake.partitions("features/items")


@pytest.mark.faults
def test_a_store_down_when_the_jobs_start_fails_them_in_seconds_naming_the_store(lake_stack, monkeypatch):
    """SeaweedFS stopped before a feature task's jobs start: the check before them (the Spark server resolves a
    table's metadata file through s3a, capped retries) fails in seconds with an error naming the job, the endpoint and
    the bucket; the store comes back and the table reads."""
    from reki_core.spark import connect_client
    from reki_core.storage.lake import lake_of
    from reki_core.storage.s3_access import ObjectStoreError
    from spark_jobs.common import jobs_named, run_jobs

    root, s3, connect, cfg = lake_stack
    monkeypatch.setenv("SPARK_CONNECT_AUTHENTICATE_TOKEN", connect.token)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.writer_key)  # the task's own identity (the lake's tables)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.writer_secret)
    cfg = make_config(root, REKI__SPARK__CONNECT_URL=connect.url, REKI__LAKE__TABLES_IN_STORE="true",
                      REKI__OBJECT_STORE__ENDPOINT_URL=s3.endpoint_url, REKI__LAKE__BUCKET=LAKE_BUCKET)
    name = f"{cfg.lake.catalog}.features.store_down_probe"
    with connect_client(cfg) as spark:  # a table in the catalog: the check needs one metadata file to ask for
        _create_day_table(spark, cfg, name)
        spark.sql(f"SELECT 1L AS user_id, 1 AS n_events, DATE'{D1}' AS dt").writeTo(name).append()
    s3.server.stop()
    try:
        with connect_client(cfg) as spark, pytest.raises(ObjectStoreError) as failure:
            started = time.monotonic()
            try:
                run_jobs(spark, jobs_named(["items"]), cfg, lake_of(cfg), D2)
            finally:
                failed_after = time.monotonic() - started
    finally:
        s3.server.start()
    message = str(failure.value)
    assert "Spark job features_items" in message and f"the object store at {s3.endpoint_url} did not answer" in message
    assert f"s3://{LAKE_BUCKET}" in message, message
    assert failed_after < 45, f"a dead store failed the job only after {failed_after:.0f} s"
    with connect_client(cfg) as spark:
        assert spark.table(name).count() == 1
