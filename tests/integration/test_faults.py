"""Fault injection (issue 7, "Faults"): each fault either fails the run with a clear message or is absorbed;
the version published before it stays readable (read-only identity, checksums verified) and a re-run
after the fault is fixed completes.

The stages run in-process through `tests/integration/pipeline_driver.py` (the functions the daily DAG
calls) on one local[1] Spark session. One baseline day is computed once; each test copies its lake,
publishes the baseline into a bucket of its own, then injects its fault.

    .venv/bin/pytest -q -m faults tests/integration/test_faults.py
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reki_core.config import PROJECT_ROOT, Config
from reki_core.storage.lake import Lake
from reki_core.storage.object_store import make_s3_client
from tests.conftest import copy_lake, make_config
from tests.integration.pipeline_driver import FAST_SETTINGS, StageFailed, publish_day, run_day

pytestmark = [pytest.mark.integration, pytest.mark.faults]

DAY = dt.date(1997, 9, 22)  # three days into ML-100K: the initial load stays small
NEXT = DAY + dt.timedelta(days=1)
DOWNSTREAM = ("raw/interactions", "raw/users", "raw/items", "features/items", "features/user_history",
              "prompts", "knowledge/assigned", "vectors/augmented")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def baseline_lake(tmp_path_factory, spark, ml100k_dir) -> Path:
    """The lake after a complete run of DAY (computed once; tests work on copies)."""
    root = tmp_path_factory.mktemp("faults-baseline")
    run_day(make_config(root, **FAST_SETTINGS), DAY, spark)
    return root / "lake"


@dataclass
class World:
    """A copy of the baseline lake with the baseline version published to a bucket of its own."""

    root: Path
    env: dict[str, str]
    cfg: Config
    lake: Lake
    seaweed: object
    baseline_version: str

    def config(self, **overrides: str) -> Config:
        return make_config(self.root, **{**self.env, **overrides})

    def publish(self, day: dt.date, run_id: str) -> dict:
        s = self.seaweed
        return publish_day(self.cfg, day, run_id, endpoint_url=s.endpoint_url, access_key=s.writer_key,
                           secret_key=s.writer_secret, bucket=self.cfg.object_store.bucket)

    def latest(self) -> dict | None:
        from reki_core.storage.publish import read_latest

        return read_latest(self.reader_store(), self.cfg.scenario.name)[0]

    def reader_store(self):
        from reki_core.storage.s3_access import ObjectStore, resolve_s3_access

        return ObjectStore(resolve_s3_access(self.cfg, access_key=self.seaweed.reader_key,
                                             secret_key=self.seaweed.reader_secret))

    def assert_served(self, version: str) -> None:
        """A consumer with the read-only identity loads `latest`, every file verified against the manifest."""
        from reki_core.serving.vector_store import VectorStore

        store = VectorStore.from_config(self.cfg, access_key=self.seaweed.reader_key,
                                        secret_key=self.seaweed.reader_secret)
        assert store.version == version
        users = self.lake.read_partition("vectors/augmented", dt.date.fromisoformat(version[:10]))
        some_user = users.loc[users["entity_kind"] == "user", "entity_id"].iloc[0]
        vectors = store.lookup_users([str(some_user)])
        assert vectors.shape[0] == 1 and store.counts.found == 1 and abs(vectors).sum() > 0


def _make_world(root: Path, baseline_lake: Path, seaweed) -> World:
    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    make_s3_client(seaweed.endpoint_url, seaweed.writer_key, seaweed.writer_secret).create_bucket(Bucket=bucket)
    copy_lake(baseline_lake, root / "lake", dirs_exist_ok=True)
    env = {**FAST_SETTINGS, "REKI__OBJECT_STORE__ENDPOINT_URL": seaweed.endpoint_url,
           "REKI__OBJECT_STORE__BUCKET": bucket}
    cfg = make_config(root, **env)
    world = World(root, env, cfg, Lake(cfg.lake_uri), seaweed, "")
    world.baseline_version = world.publish(DAY, "baseline")["version"]
    world.assert_served(world.baseline_version)
    return world


@pytest.fixture
def world(tmp_path, baseline_lake, seaweed) -> World:
    return _make_world(tmp_path, baseline_lake, seaweed)


def _deliver_next_day(world: World) -> Path:
    """The upstream delivery of NEXT (as the replay writes it); returns the interactions file."""
    from reki_core.datasets.source import delivery_files, replay_delivery

    replay_delivery(world.cfg, world.lake, [NEXT], snapshot_day=NEXT)
    (path,) = delivery_files(world.lake, "interactions", NEXT)
    return Path(path)


def _nothing_landed_for(lake: Lake, day: dt.date) -> None:
    written = [d for d in DOWNSTREAM if lake.has_partition(d, day)]
    assert not written, f"a failed landing must leave no partition of {day}, found {written}"


# ---------------------------------------------------------------- 1. object store down during publish


def test_object_store_stopped_during_publish_then_restarted(world, seaweed, monkeypatch):
    from reki_core.storage.publish import list_versions, read_manifest, version_name
    from reki_core.storage.s3_access import ObjectStore, ObjectStoreError

    before = world.latest()
    uploaded: list[str] = []
    real_put = ObjectStore.put

    def put_then_stop_server(self, key, body, **conditions):
        result = real_put(self, key, body, **conditions)
        uploaded.append(key)
        if len(uploaded) == 1:  # the version's first file is stored; the server goes down mid-publish
            seaweed.server.stop()
        return result

    monkeypatch.setattr(ObjectStore, "put", put_then_stop_server)
    try:
        with pytest.raises(ObjectStoreError, match="cannot connect to .*is the object store running"):
            world.publish(DAY, "rerun-1")
    finally:
        monkeypatch.setattr(ObjectStore, "put", real_put)  # not undo(): that would restore AWS_* too
        seaweed.server.start()  # same state folder: data and identities survive the restart

    failed_version = version_name(DAY, "rerun-1")
    assert len(uploaded) == 1 and f"v={failed_version}/" in uploaded[0]
    assert world.latest() == before, "_LATEST.json must not move for a failed publish"
    store = world.reader_store()
    assert read_manifest(store, world.cfg.scenario.name, failed_version) is None
    half = list_versions(store, world.cfg.scenario.name)[failed_version]
    assert not half["complete"]  # the uploaded file is there but invisible to consumers (no manifest)
    world.assert_served(world.baseline_version)

    retried = world.publish(DAY, "rerun-1")
    assert retried["version"] == failed_version and retried["latest_moved"]
    assert world.latest()["version"] == failed_version
    world.assert_served(failed_version)


# ---------------------------------------------------------------- 2. worker killed mid-shard


def test_worker_killed_mid_shard_resumes_without_repeating(world):
    from reki_core.llm.runner import plan_shards, run_shard
    from reki_core.llm.store import sampling_version, store_files

    # Another sampling version makes every prompt of DAY pending again; small shards keep the test short
    # and batches of 4 give the killed shard several checkpoints.
    overrides = {"REKI__LLM__SAMPLING__MAX_TOKENS": "6", "REKI__LLM__ENGINE__BATCH_SIZE": "4",
                 "REKI__LLM__SHARD_SIZE": "40"}
    cfg = world.config(**overrides)
    shards = plan_shards(cfg, DAY)
    assert len(shards) > 1
    plan = world.lake.read_partition("knowledge/plan", DAY)
    shard_hashes = set(plan.loc[plan["shard_id"] == 0, "prompt_hash"])
    pending = shards[0]["n_prompts"]
    assert pending == len(shard_hashes) == 40

    env = {**os.environ, **world.env, **overrides, "PYTHONPATH": str(PROJECT_ROOT),
           "REKI__PATHS__STATE_DIR": str(cfg.state_dir), "REKI__PATHS__LAKE_URI": cfg.lake_uri,
           "REKI__PATHS__DATA_DIR": str(cfg.data_dir), "REKI__SCENARIO": cfg.scenario.name}
    worker = subprocess.Popen(
        [sys.executable, "-m", "reki_core.llm.extract_shard", "--config", str(PROJECT_ROOT / "conf" / "reki.yaml"),
         "--dt", DAY.isoformat(), "--shard", "0"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = Path(cfg.lake_uri) / "knowledge" / "_inflight" / f"dt={DAY}" / "shard-00000"

    def finished_batches() -> list[Path]:
        return [p for p in checkpoints.glob("*.parquet") if not p.name.startswith(".")] if checkpoints.exists() else []

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and worker.poll() is None and not finished_batches():
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL, f"the worker ended on its own: {worker.stderr.read()[-3000:]}"
    saved = pd.concat([pq.read_table(p).to_pandas() for p in finished_batches()])
    assert 0 < len(saved) < pending and set(saved["prompt_hash"]) <= shard_hashes

    resumed = run_shard(cfg, DAY, 0)  # the retry of the mapped task
    assert resumed["success"] and resumed["cache_hits"] == 0 and resumed["resumed_from_earlier_attempt"] == len(saved)
    # Calls count the killed attempt's answers too: had this attempt asked a checkpointed prompt again,
    # they would add up to more than the shard's prompts.
    assert resumed["calls"] == resumed["answered"] == pending, "a checkpointed prompt was asked again"
    assert resumed["stored"] == pending and not checkpoints.exists()

    answers = pd.concat([pq.read_table(p).to_pandas() for p in store_files(world.lake)])
    answers = answers[answers["sampling_version"] == sampling_version(cfg)]
    assert set(answers["prompt_hash"]) == shard_hashes and answers["prompt_hash"].is_unique
    world.assert_served(world.baseline_version)


# ---------------------------------------------------------------- 3. truncated delivery


def test_truncated_delivery_fails_landing_then_fixed_day_publishes(world, spark):
    from reki_core.landing import LandingError

    path = _deliver_next_day(world)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])

    with pytest.raises(StageFailed) as failed:
        run_day(world.cfg, NEXT, spark)
    assert failed.value.stage == "land" and failed.value.ran == []
    cause = failed.value.__cause__
    assert isinstance(cause, LandingError)
    assert str(path) in str(cause) and "rule 'readable'" in str(cause) and "not readable as Parquet" in str(cause)
    _nothing_landed_for(world.lake, NEXT)
    assert world.lake.partitions("raw/interactions")[-1] == DAY
    world.assert_served(world.baseline_version)

    path.write_bytes(good)  # upstream re-delivers the file whole
    run = run_day(world.cfg, NEXT, spark)
    assert run.results["land"]["rows_today"] == len(pq.read_table(path))
    published = world.publish(NEXT, "after-fix")
    assert published["latest_moved"] and world.latest()["dt"] == NEXT.isoformat()
    world.assert_served(published["version"])


# ---------------------------------------------------------------- 4. a day delivered twice


def test_day_delivered_twice(world):
    from reki_core.landing import LandingError, land, run_raw_gate

    path = _deliver_next_day(world)
    delivered = pq.read_table(path).to_pandas()
    shutil.copyfile(path, path.with_name("interactions.resent.parquet"))  # the same file, another name

    landed = land(world.cfg, NEXT)
    assert landed["duplicate_deliveries"] == 1 and landed["rejected"] == 0
    assert landed["rows_today"] == len(delivered), "an identical re-delivery must be read once"
    first_landing = world.lake.read_partition("raw/interactions", NEXT)
    assert len(first_landing) == len(delivered)

    # A second, different delivery that repeats five (user, item, ts) keys with other ratings.
    correction = path.with_name("interactions.update-2.parquet")
    changed = delivered.head(5).assign(rating=lambda d: d["rating"] % 5 + 1)
    pq.write_table(pa.Table.from_pandas(changed, schema=pq.read_schema(path), preserve_index=False), correction)
    with pytest.raises(LandingError) as failed:
        land(world.cfg, NEXT)
    message = str(failed.value)
    assert f"{correction}: column 'user_id,item_id,ts': rule 'unique'" in message and "5 row(s)" in message
    pd.testing.assert_frame_equal(world.lake.read_partition("raw/interactions", NEXT), first_landing)

    quarantined = land(world.config(REKI__QUALITY__RAW_BAD_ROWS_POLICY="quarantine"), NEXT)
    assert quarantined["rejected"] == 5 and quarantined["rows_today"] == len(delivered)
    rejected = world.lake.read_partition("raw/_rejected", NEXT)
    assert set(rejected["_source_file"]) == {str(correction)}
    assert rejected["_reason"].str.contains("unique").all()
    world.assert_served(world.baseline_version)

    correction.unlink()  # upstream withdraws the conflicting delivery
    fixed = land(world.cfg, NEXT)
    assert fixed["rejected"] == 0 and not world.lake.has_partition("raw/_rejected", NEXT)
    assert run_raw_gate(world.cfg, NEXT)["success"]


# ---------------------------------------------------------------- 5. upstream schema change


@pytest.mark.parametrize("change, column, rule", [
    (lambda df: df.assign(session_id="s-1"), "session_id", "unexpected column (upstream schema change?)"),
    (lambda df: df.drop(columns=["rating"]), "rating", "required column is missing"),
])
def test_upstream_schema_change_names_file_and_column(world, change, column, rule):
    from reki_core.landing import LandingError, land, run_raw_gate

    path = _deliver_next_day(world)
    good = path.read_bytes()
    pq.write_table(pa.Table.from_pandas(change(pq.read_table(path).to_pandas()), preserve_index=False), path)

    with pytest.raises(LandingError) as failed:
        land(world.cfg, NEXT)
    assert f"{path}: column '{column}': rule 'schema': {rule}" in str(failed.value)
    _nothing_landed_for(world.lake, NEXT)
    world.assert_served(world.baseline_version)

    path.write_bytes(good)
    assert land(world.cfg, NEXT)["rows_today"] > 0
    assert run_raw_gate(world.cfg, NEXT)["success"]


# ---------------------------------------------------------------- 6. full disk under the lake


def _can_mount_tmpfs(target: Path) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], capture_output=True)
    if probe.returncode != 0:
        return False
    subprocess.run(["umount", str(target)], check=True)
    return True


def _fill(folder: Path) -> Path:
    """Write a filler file until the filesystem reports ENOSPC; returns it."""
    filler = folder / "_filler"
    with filler.open("wb", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    fh.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


class ParquetWriterOutOfSpace:
    """Where no tmpfs can be mounted (not root): every Parquet write fails with ENOSPC after part of its file,
    as pyarrow fails on a full disk. The real full disk, under root, is the tmpfs of `full_disk`."""

    def __init__(self, monkeypatch):
        self.full = False
        real = pq.write_table

        def write_table(table, where, *args, **kwargs):
            if self.full:
                if isinstance(where, (str, os.PathLike)):
                    Path(where).write_bytes(b"PAR1" + b"\0" * 4096)  # the half file a full disk leaves
                else:
                    where.write(b"PAR1" + b"\0" * 4096)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(table, where, *args, **kwargs)

        monkeypatch.setattr(pq, "write_table", write_table)
        real_writer_table = pq.ParquetWriter.write_table

        def writer_write_table(writer, table, *args, **kwargs):  # pyiceberg's table writes go through a ParquetWriter
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_writer_table(writer, table, *args, **kwargs)

        monkeypatch.setattr(pq.ParquetWriter, "write_table", writer_write_table)

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False


class TmpfsOutOfSpace:
    """ENOSPC for real: the lake on its own small tmpfs, filled with a filler file."""

    def __init__(self, lake_dir: Path):
        self.lake_dir, self.filler = lake_dir, None

    def fill(self) -> None:
        self.filler = _fill(self.lake_dir)

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def full_disk(tmp_path, baseline_lake, seaweed, monkeypatch):
    """(world, disk): `disk.fill()` makes every write under the lake fail with ENOSPC, `disk.free()` undoes it.
    A real tmpfs where the runner may mount one (root), the Parquet writer's seam elsewhere."""
    lake_dir = tmp_path / "lake"
    if not _can_mount_tmpfs(lake_dir):
        print("full disk: no tmpfs mount allowed here (not root); ENOSPC is raised by the Parquet writer instead")
        yield _make_world(tmp_path, baseline_lake, seaweed), ParquetWriterOutOfSpace(monkeypatch)
        return
    used = sum(p.stat().st_size for p in baseline_lake.rglob("*") if p.is_file())
    size_mb = used // (1 << 20) + 16
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(lake_dir)], check=True)
    try:
        yield _make_world(tmp_path, baseline_lake, seaweed), TmpfsOutOfSpace(lake_dir)
    finally:
        subprocess.run(["umount", "-l", str(lake_dir)], check=True)


def test_full_disk_keeps_previous_partition_and_rerun_completes(full_disk):
    from reki_core.models.training import apply_adaptor

    world, disk = full_disk
    previous = world.lake.read_partition("vectors/augmented", DAY)
    snapshot = world.lake.load_table("vectors/augmented").current_snapshot().snapshot_id
    disk.fill()

    with pytest.raises(OSError) as failed:
        apply_adaptor(world.cfg, DAY)  # a re-run of the augment step rewrites vectors/augmented/dt=DAY
    assert "No space left on device" in str(failed.value) or failed.value.errno == errno.ENOSPC
    pd.testing.assert_frame_equal(world.lake.read_partition("vectors/augmented", DAY), previous)
    # Nothing was committed: the table is at the same snapshot (files the failed write left are orphans, which
    # reki_lake_maintenance removes).
    assert world.lake.load_table("vectors/augmented").current_snapshot().snapshot_id == snapshot
    world.assert_served(world.baseline_version)

    disk.free()
    rerun = apply_adaptor(world.cfg, DAY)
    assert rerun["success"]
    pd.testing.assert_frame_equal(world.lake.read_partition("vectors/augmented", DAY), previous)
    published = world.publish(DAY, "after-disk-freed")
    assert published["latest_moved"]
    world.assert_served(published["version"])
