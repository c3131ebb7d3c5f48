"""reki_daily_refresh: land the day's interactions, refresh knowledge, and publish augmented vectors."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from reki_airflow.assets import AUGMENTED_VECTORS
from reki_airflow.runtime import default_args, gpu_task, load_pipeline_config, run_gate, run_id, s3_credentials, task_setup
from reki_airflow.spark_connect import SparkConnectJobs
from reki_airflow.timetables import DailyIntervals
from spark_jobs.features import FEATURE_JOBS

CFG = load_pipeline_config()

DOC = """
### REKI daily refresh

One run per day; `dt` = the data interval's start (UTC), never the wall clock. A manual run at
logical date D (midnight UTC) processes D, as the scheduled and backfill runs of D do.

1. **land** (a Spark Connect task, job `landing`) the day's deliveries from `incoming/` into `raw/` (on an empty
   lake: all history up to `dt`); **raw_gate** validates them (Great Expectations; the users and items suites on
   Spark DataFrames).
2. **Spark** (clients of the warm Spark Connect server, connection `spark_connect_default`):
   **spark_features** runs `items`, `user_history` (knowledge windows, dirty users) and `ctr_samples`
   (point-in-time knowledge join) on one Connect session of its own; **needs_groups** skips **spark_clusters** (collective-extraction groups) unless today's extraction
   mode is collective; **feature_checks** (a Spark Connect task, job `feature_checks`: the item and group rules)
   and **feature_gate** (reads its recorded checks; the keyed datasets' rules on the day's changes).
3. **prompts** (factorization prompting; a Spark Connect task, job `prompts`, which also evaluates the gate's rules)
   and **prompts_gate** (reads the job's recorded checks).
4. **plan_shards** then one mapped **extract** task per shard, clients of the warm LLM servers (pool
   `llm.client_pool`, `llm.max_active_shards` at a time; with an in-process engine, pool `gpu` as every
   task that may use CUDA: encode, train_if_no_model, augment and the weekly training): only prompts whose
   hash has no knowledge yet go to the LLM; **assign_knowledge** (a Spark Connect task, job `knowledge`: the
   text to encode per user and item); **answers_gate**.
5. **encoding_misses** (a Spark Connect task: validates the assignment, writes the texts the embedding cache lacks),
   **encode** (encodes them batch by batch into the cache table), **knowledge_vectors** (a Spark Connect task: the
   assignment joined with the cache); **train_if_no_model** registers a first adaptor
   when none exists (weekly retraining is `reki_adaptor_training`); **augment** applies the current
   adaptor to every user and item vector; **vectors_checks** (a Spark Connect task, job `vectors_checks`) evaluates the
   vectors gate's rules and **vectors_gate** (reads its recorded checks) checks every entity has one finite vector.
6. **publish** a version to object storage (manifest last, `_LATEST.json` only forward) and emit
   the `reki_augmented_vectors` asset event with the version; it writes the run report too and
   publishes it inside the version.

Every task is idempotent for its `dt`. Backfills (the DAG must be unpaused):
`bash infra/backfill.sh A B` (README: "Airflow UI, triggering and backfills").
"""

DEFAULT_ARGS = default_args(CFG, retries=2, retry_delay=dt.timedelta(seconds=20),
                            execution_timeout=dt.timedelta(hours=2))
# A failed gate is deterministic: retrying it only delays the alert.
GATE = {"retries": 0}
# Every task that may pick CUDA: the gpu pool, and the gpu queue on the cluster profile's Celery workers.
GPU = gpu_task(CFG)
# Extraction shards: clients of the LLM servers (openai backend) need no GPU slot, in-process engines hold one.
EXTRACT = ({"pool": CFG.llm.client_pool} if CFG.llm.backend == "openai" else GPU) | {
    "max_active_tis_per_dagrun": CFG.llm.max_active_shards}


def spark_jobs(task_id: str, *jobs: str, **kwargs) -> SparkConnectJobs:
    return SparkConnectJobs(task_id=task_id, jobs=jobs, conn_id=CFG.spark.connect_conn_id, **kwargs)


# A replayed dataset (the embedded default) has a last day: no scheduled run is created past it, so
# unpausing the DAG today does not start a run for a date that has no data. Live sources have no end.
REPLAY_END = (None if CFG.scenario.source.kind == "files"
              else dt.datetime.combine(CFG.scenario.source.end_date, dt.time(), tzinfo=dt.UTC))


@dag(
    dag_id="reki_daily_refresh",
    schedule=DailyIntervals(),  # day-long intervals; a manual run at midnight D processes D
    start_date=dt.datetime.combine(CFG.scenario.source.start_date, dt.time(), tzinfo=dt.UTC),
    end_date=REPLAY_END,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    doc_md=DOC,
    tags=["reki", "daily", "knowledge"],
)
def reki_daily_refresh():
    @task(**GATE)
    def raw_gate(**context) -> dict:
        from reki_airflow.spark_connect import task_connect_session
        from reki_core.landing import run_raw_gate

        cfg, day = task_setup(context)
        with task_connect_session(context, CFG.spark.connect_conn_id) as spark:  # the snapshots' suites run on Spark
            return run_gate(context, "raw", lambda: run_raw_gate(cfg, day, spark), cfg)

    # Skips only the clusters job (individual extraction needs no groups); the feature gate still runs.
    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def needs_groups(**context) -> bool:
        from reki_core.prompts import groups_needed
        from reki_core.storage.lake import lake_of

        cfg, day = task_setup(context)
        return groups_needed(cfg, lake_of(cfg), day)

    @task(**GATE)
    def feature_gate(**context) -> dict:
        from reki_core.quality.features import run_feature_gates

        cfg, day = task_setup(context)
        return run_gate(context, "features", lambda: run_feature_gates(cfg, day), cfg)

    @task(**GATE)
    def prompts_gate(**context) -> dict:
        from reki_core.quality.prompts import gate_prompts

        cfg, day = task_setup(context)
        return run_gate(context, "prompts", lambda: gate_prompts(cfg, day).summary(), cfg)

    @task
    def plan_shards(**context) -> list[dict]:
        from reki_core.llm.runner import plan_shards as plan

        cfg, day = task_setup(context)
        return plan(cfg, day)

    @task(**EXTRACT)
    def extract(shard: dict, **context) -> dict:
        from reki_core.llm.runner import run_shard_in_process_or_venv

        cfg, day = task_setup(context)
        return run_shard_in_process_or_venv(cfg, day, shard["shard_id"])

    @task(**GATE)
    def answers_gate(**context) -> dict:
        from reki_core.llm.runner import extraction_summary
        from reki_core.quality.answers import validate_answers

        cfg, day = task_setup(context)
        run_gate(context, "llm_answers", lambda: validate_answers(cfg, day), cfg)
        return extraction_summary(cfg, day)

    @task(**GPU)  # may pick CUDA: never beside an extraction shard or the weekly training
    def encode(**context) -> dict:
        from reki_core.encoding import encode_misses

        cfg, day = task_setup(context)
        return encode_misses(cfg, day)

    @task(**GPU)  # may pick CUDA: never beside an extraction shard or the weekly training
    def train_if_no_model(**context) -> dict:
        from reki_core.models.training import has_current_model, train_model

        cfg, day = task_setup(context)
        if has_current_model(cfg):
            return {"trained": False, "reason": "a registered model exists; retraining is reki_adaptor_training"}
        return {"trained": True, **train_model(cfg, day)}

    @task(**GPU)  # may pick CUDA: never beside an extraction shard or the weekly training
    def augment(**context) -> dict:
        from reki_core.models.training import apply_adaptor

        cfg, day = task_setup(context)
        return apply_adaptor(cfg, day)

    @task(**GATE)
    def vectors_gate(**context) -> dict:
        from reki_core.quality.vectors import gate_vectors

        cfg, day = task_setup(context)
        return run_gate(context, "vectors", lambda: gate_vectors(cfg, day), cfg)

    @task(outlets=[AUGMENTED_VECTORS])
    def publish(**context) -> dict:
        from reki_core.storage.publish import publish_with_report

        cfg, day = task_setup(context)
        result = publish_with_report(cfg, day, run_id(context), **s3_credentials())
        context["outlet_events"][AUGMENTED_VECTORS].extra = {
            "version": result["version"], "uri": result["uri"], "manifest_uri": result["manifest_uri"], "dt": day.isoformat()}
        return {k: result[k] for k in ("version", "uri", "manifest_uri", "latest_moved")}

    landed = spark_jobs("land", "landing")  # spark_jobs/landing.py: the deliveries into raw/
    raw_ok = raw_gate()
    features = spark_jobs("spark_features", *FEATURE_JOBS)
    clusters = spark_jobs("spark_clusters", "clusters")
    # spark_jobs/feature_checks.py: the feature gate's rules on items and clusters; none_failed: clusters may be skipped
    feature_checks = spark_jobs("feature_checks", "feature_checks", trigger_rule="none_failed")
    features_ok = feature_gate()
    built = spark_jobs("prompts", "prompts")  # spark_jobs/prompts.py: the day's prompts and the gate's checks
    prompts_ok = prompts_gate()
    shards = plan_shards()
    extracted = extract.expand(shard=shards)
    # A Spark job (spark_jobs/knowledge.py), none_failed: on a day whose prompts are all cached the mapped extract
    # has zero tasks (skipped).
    assigned = spark_jobs("assign_knowledge", "knowledge", trigger_rule="none_failed")
    answers_ok = answers_gate()
    # Spark jobs around the Python task: the texts the cache lacks, then the assignment joined with the cache.
    misses = spark_jobs("encoding_misses", "encoding_misses")
    encoded = encode()
    vectors = spark_jobs("knowledge_vectors", "knowledge_vectors")
    model = train_if_no_model()
    augmented = augment()
    vectors_checked = spark_jobs("vectors_checks", "vectors_checks")  # spark_jobs/vectors_checks.py: the gate's rules

    landed >> raw_ok >> features >> needs_groups() >> clusters
    [features, clusters] >> feature_checks >> features_ok >> built >> prompts_ok >> shards
    extracted >> assigned >> answers_ok >> misses >> encoded >> vectors >> model >> augmented >> vectors_checked
    vectors_checked >> vectors_gate() >> publish()


reki_daily_refresh()
