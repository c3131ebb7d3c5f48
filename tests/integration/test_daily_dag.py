"""The daily DAG end to end through real Airflow (`airflow dags test`), real Spark (a Spark Connect server),
the real smoke LLM, the real encoder, and a real SeaweedFS with credentials enforced."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest

from reki_core.config import PROJECT_ROOT
from reki_core.runlog import read_steps
from reki_core.storage.lake import Lake
from tests.conftest import make_config

pytestmark = pytest.mark.integration

DT = dt.date(1997, 9, 22)  # three days into ML-100K: a small initial load keeps the test quick
# Small but real settings: fewer generated tokens and epochs, same code paths. Three days of data
# give AUCs that are noise, so the evaluation gate is made lenient here (its maths is unit-tested).
FAST = {"REKI__LLM__SAMPLING__MAX_TOKENS": "12", "REKI__MODEL__MAX_EPOCHS": "2",
        "REKI__LLM__SHARD_SIZE": "400", "REKI__MODEL__AUC_TOLERANCE_VS_BASELINE": "1.0"}


def dag_env(tmp, seaweed, spark_connect) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FAST)
    env.update(spark_connect.env())
    env.update({
        "REKI__PATHS__LAKE_URI": str(tmp / "lake"),
        "REKI__PATHS__STATE_DIR": str(tmp / "state"),
        "REKI__OBJECT_STORE__ENDPOINT_URL": seaweed.endpoint_url,
        "REKI__OBJECT_STORE__BUCKET": seaweed.bucket,
        "AWS_ACCESS_KEY_ID": seaweed.writer_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.writer_secret,
        "AWS_ENDPOINT_URL": seaweed.endpoint_url,
    })
    env.pop("AIRFLOW_CONN_AWS_DEFAULT", None)  # the test's SeaweedFS, not the one `make run` uses
    return env


def run_dag(env: dict[str, str], day: dt.date) -> subprocess.CompletedProcess:
    # A manual run at midnight D processes D (reki_airflow.timetables).
    return subprocess.run([str(PROJECT_ROOT / ".venv/bin/airflow"), "dags", "test", "reki_daily_refresh", day.isoformat()],
                          env=env, capture_output=True, text=True, timeout=1800, cwd=PROJECT_ROOT)


def assert_success(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "state=success" in out, out[-6000:]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, seaweed, spark_connect, ml100k_dir):
    tmp = tmp_path_factory.mktemp("daily")
    env = dag_env(tmp, seaweed, spark_connect)
    proc = run_dag(env, DT)
    assert_success(proc)
    return tmp, env


def steps_of(tmp, day) -> dict:
    return {s["step"]: s for s in read_steps(Lake(str(tmp / "lake")), day)}


def test_every_stage_ran_and_published(first_run, seaweed):
    tmp, _ = first_run
    steps = steps_of(tmp, DT)
    for step in ("land", "raw_gate", "features_items", "features_user_history", "features_ctr_samples",
                 "features_clusters", "feature_checks", "feature_gates", "prompts", "llm_plan", "llm_assign",
                 "llm_answers_gate", "encoding_misses", "encode_knowledge", "knowledge_vectors", "train_model",
                 "apply_adaptor", "vectors_checks", "vectors_gate", "publish"):
        assert step in steps, f"step {step} left no run record"
        assert steps[step].get("success", True), steps[step]
    assert steps["land"]["initial_load"] is True
    assert steps["features_clusters"]["skipped"] is True, "individual mode needs no collective-extraction groups"
    prompts = Lake(str(tmp / "lake")).read_partition("prompts", DT)
    asked = prompts[prompts["ask_llm"]]["prompt_hash"].nunique()  # identical prompt texts share one call
    assert steps["prompts"]["rows"] > 0 and steps["llm_plan"]["n_pending"] == asked


def test_consumer_reads_published_vectors_with_read_only_identity(first_run, seaweed):
    from reki_core.serving.vector_store import VectorStore

    tmp, _ = first_run
    cfg = make_config(tmp, REKI__OBJECT_STORE__ENDPOINT_URL=seaweed.endpoint_url,
                      REKI__OBJECT_STORE__BUCKET=seaweed.bucket)
    store = VectorStore.from_config(cfg, access_key=seaweed.reader_key, secret_key=seaweed.reader_secret)
    assert store.version.removeprefix("v=").startswith(f"{DT.isoformat()}_")
    users = Lake(cfg.lake_uri).read_partition("raw/users", DT)["user_id"].tolist()
    user_vecs, item_vecs = store.lookup(users[:5], ["1"])
    assert user_vecs.shape == (5, 32) and item_vecs.shape == (1, 32)
    assert store.counts.found == 6 and store.counts.zero_fallback == 0


def test_rerun_of_the_same_date_makes_no_llm_calls_and_keeps_latest(first_run, seaweed):
    from reki_core.storage.publish import read_latest
    from reki_core.storage.s3_access import ObjectStore, resolve_s3_access

    tmp, env = first_run
    cfg = make_config(tmp, REKI__OBJECT_STORE__ENDPOINT_URL=seaweed.endpoint_url,
                      REKI__OBJECT_STORE__BUCKET=seaweed.bucket)
    store = ObjectStore(resolve_s3_access(cfg, access_key=seaweed.reader_key, secret_key=seaweed.reader_secret))
    before, _ = read_latest(store, cfg.scenario.name)
    prompts_before = Lake(cfg.lake_uri).read_partition("prompts", DT).sort_values("prompt_id").reset_index(drop=True)
    assert_success(run_dag(env, DT))
    steps = steps_of(tmp, DT)
    assert steps["llm_plan"]["n_pending"] == 0, "a re-run must find every prompt in the knowledge store"
    prompts_after = Lake(cfg.lake_uri).read_partition("prompts", DT).sort_values("prompt_id").reset_index(drop=True)
    assert prompts_after["prompt_hash"].tolist() == prompts_before["prompt_hash"].tolist()
    after, _ = read_latest(store, cfg.scenario.name)
    assert after["dt"] == before["dt"] == DT.isoformat()
    # Every stage after the (empty) extraction still ran and published a new version of the same date.
    assert steps["publish"]["success"] is True and steps["publish"]["version"] != before["version"]
    assert "llm_shard_00000" not in steps


def test_wrong_s3_key_is_refused_clearly(seaweed):
    from botocore.exceptions import ClientError

    from reki_core.storage.object_store import make_s3_client

    client = make_s3_client(seaweed.endpoint_url, seaweed.writer_key, "not-the-secret")
    with pytest.raises(ClientError) as err:
        client.list_objects_v2(Bucket=seaweed.bucket)
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    anonymous = subprocess.run([sys.executable, "-c", (
        "import urllib.request\n"
        f"try: urllib.request.urlopen('{seaweed.endpoint_url}/{seaweed.bucket}/'); print('open')\n"
        "except Exception as e: print(getattr(e, 'code', e))")], capture_output=True, text=True)
    assert anonymous.stdout.strip() in {"403", "401"}
