"""Drive the daily pipeline in-process, stage by stage, through the same `reki_core` functions the
`reki_daily_refresh` DAG calls (Spark jobs through their `run(spark, cfg, lake, day)` on one shared
session instead of spark-submit). The fault suite uses it to stop at the first failing stage and to
re-run a date after the fault is fixed.
"""

from __future__ import annotations

import datetime as dt
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from reki_core.config import Config
from reki_core.storage.lake import as_date, lake_of

# Small but real settings (as tests/integration/test_daily_dag.py): fewer generated tokens and one
# epoch; the evaluation gate is lenient because a few days of data give AUCs that are noise.
FAST_SETTINGS = {
    "REKI__LLM__SAMPLING__MAX_TOKENS": "8",
    "REKI__LLM__SHARD_SIZE": "400",
    "REKI__MODEL__MAX_EPOCHS": "1",
    "REKI__MODEL__AUC_TOLERANCE_VS_BASELINE": "1.0",
    "REKI__SPARK__SHUFFLE_PARTITIONS": "2",
}

SPARK_JOBS = ("items", "user_history", "ctr_samples", "clusters")

# The DAG's task order (dags/reki_daily_refresh.py), publish excluded.
STAGES = ("land", "raw_gate", *(f"spark_{job}" for job in SPARK_JOBS), "feature_checks", "feature_gate", "prompts",
          "prompts_gate", "plan_shards", "extract", "assign_knowledge", "answers_gate", "encode", "train_if_no_model", "augment")


class StageFailed(RuntimeError):
    """A stage raised; `stage` names it, `ran` lists the stages that completed before it (the cause is chained)."""

    def __init__(self, stage: str, day: dt.date, ran: list[str], cause: BaseException):
        super().__init__(f"stage '{stage}' failed for dt={day}: {type(cause).__name__}: {cause}")
        self.stage = stage
        self.ran = ran


@dataclass
class DayRun:
    day: dt.date
    ran: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


def _spark_stage(spark, cfg: Config, day: dt.date, job: str) -> Callable[[], dict]:
    def run() -> dict:
        from reki_core.runlog import timed_step

        module = importlib.import_module(f"spark_jobs.{job}")
        lake = lake_of(cfg)
        with timed_step(lake, day, f"features_{job}") as payload:  # the step record spark-submit's main writes
            payload.update(module.run(spark, cfg, lake, day))
        return payload

    return run


def _extract_all(cfg: Config, day: dt.date, shards: list[dict]) -> list[dict]:
    from reki_core.llm.runner import run_shard

    return [run_shard(cfg, day, s["shard_id"]) for s in shards]


def _train_if_no_model(cfg: Config, day: dt.date) -> dict:
    from reki_core.models.training import has_current_model, train_model

    if has_current_model(cfg):
        return {"trained": False}
    return {"trained": True, **train_model(cfg, day, progress=False)}


def run_day(cfg: Config, day: str | dt.date, spark, *, until: str | None = None) -> DayRun:
    """Run the stages of `day` in DAG order (through `until`, inclusive); raises StageFailed at the first failure."""
    from reki_core.encoding import encode_knowledge
    from reki_core.landing import land, run_raw_gate
    from reki_core.llm.runner import assign_knowledge, plan_shards
    from reki_core.models.training import apply_adaptor
    from reki_core.prompts import build_prompts
    from reki_core.quality.answers import validate_answers
    from reki_core.quality.features import run_feature_gates
    from reki_core.quality.prompts import gate_prompts
    from spark_jobs.common import jobs_named, run_jobs

    day = as_date(day)
    run = DayRun(day)
    stages: dict[str, Callable[[], Any]] = {
        "land": lambda: land(cfg, day, spark),  # the Spark job on the shared session
        "raw_gate": lambda: run_raw_gate(cfg, day, spark),
        **{f"spark_{job}": _spark_stage(spark, cfg, day, job) for job in SPARK_JOBS},
        "feature_checks": lambda: run_jobs(spark, jobs_named(["feature_checks"]), cfg, lake_of(cfg), day),
        "feature_gate": lambda: run_feature_gates(cfg, day),
        "prompts": lambda: build_prompts(cfg, day, spark=spark),  # the Spark job on the shared session
        "prompts_gate": lambda: gate_prompts(cfg, day).summary(),
        "plan_shards": lambda: plan_shards(cfg, day),
        "extract": lambda: _extract_all(cfg, day, run.results["plan_shards"]),
        "assign_knowledge": lambda: assign_knowledge(cfg, day, spark),  # the Spark job on the shared session
        "answers_gate": lambda: validate_answers(cfg, day).summary(),
        "encode": lambda: encode_knowledge(cfg, day, spark=spark),  # its Spark jobs on the shared session
        "train_if_no_model": lambda: _train_if_no_model(cfg, day),
        "augment": lambda: apply_adaptor(cfg, day),
    }
    assert tuple(stages) == STAGES
    for name in STAGES:
        try:
            run.results[name] = stages[name]()
        except Exception as exc:
            raise StageFailed(name, day, list(run.ran), exc) from exc
        run.ran.append(name)
        if name == until:
            break
    return run


def publish_day(cfg: Config, day: str | dt.date, run_id: str, *, endpoint_url: str, access_key: str,
                secret_key: str, bucket: str) -> dict[str, Any]:
    """What the DAG's publish task does (`publish_with_report`) with the writer identity."""
    from reki_core.storage.publish import publish_with_report

    return publish_with_report(cfg, day, run_id, endpoint_url=endpoint_url, access_key=access_key,
                               secret_key=secret_key, bucket=bucket)
