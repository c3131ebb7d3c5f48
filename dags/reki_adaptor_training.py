"""reki_adaptor_training: retrain the HEIN adaptor jointly with the backbone, gate it, register it."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

from reki_airflow.assets import ADAPTOR_MODEL
from reki_airflow.runtime import default_args, gpu_task, load_pipeline_config, task_setup

CFG = load_pipeline_config()

DOC = """
### REKI adaptor training

Weekly (and on demand from the UI): trains the hybrid-expert adaptor jointly with the configured
backbone on the newest CTR samples and knowledge vectors up to the interval's end, early-stopping on
the validation split, and evaluates on the test split. The **evaluation gate** registers the version
as current only if its test AUC is not below the same backbone without knowledge, nor below the
current version, by more than the configured tolerances; the comparison is in the model card
(`models/registry/<version>/model_card.{json,md}`). The daily refresh applies the current version.
"""


@dag(
    dag_id="reki_adaptor_training",
    schedule=CronDataIntervalTimetable("0 3 * * 0", timezone="UTC"),  # weekly, Sunday 03:00 UTC
    start_date=dt.datetime.combine(CFG.scenario.source.start_date, dt.time(), tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(CFG, retries=1, retry_delay=dt.timedelta(minutes=2),
                              execution_timeout=dt.timedelta(hours=6)),
    doc_md=DOC,
    tags=["reki", "training", "weekly"],
)
def reki_adaptor_training():
    @task(**gpu_task(CFG))  # may pick CUDA: never beside an extraction shard of the daily refresh
    def train(**context) -> dict:
        from reki_core.models.training import train_model, training_day

        cfg, _ = task_setup(context)
        end = context["data_interval_end"]
        card = train_model(cfg, training_day(cfg, dt.date(end.year, end.month, end.day)), progress=False)
        return {k: card[k] for k in ("version", "dt", "published", "gate", "auc_gain_vs_no_knowledge")}

    @task(retries=0, outlets=[ADAPTOR_MODEL])
    def evaluation_gate(trained: dict, **context) -> dict:
        from reki_airflow.notifiers import mark_alerted, notify_gate_failure

        if not trained["published"]:
            failing = [c for c in trained["gate"]["checks"] if not c["passed"]]
            notify_gate_failure(context, "model_evaluation", [
                {"expectation": c["check"], "unexpected_count": 1,
                 "observed_value": f"AUC {c['auc']:.4f} vs {c.get('reference_auc')}"} for c in failing])
            raise mark_alerted(ValueError(f"model {trained['version']} failed the evaluation gate: {failing}"))
        context["outlet_events"][ADAPTOR_MODEL].extra = {"version": trained["version"], "dt": trained["dt"]}
        return trained

    evaluation_gate(train())


reki_adaptor_training()
