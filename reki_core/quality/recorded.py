"""Gates on checks a Spark job recorded: what the prompts, feature and vectors gates share.

A Spark job evaluates a gate's rules over every row (in Spark, bounded per task) and records in its run record
(`_runs/dt=D/<step>.json`, `checks`): per rule the count of rows that break it (`failed`), a few of those rows
(`examples`), and a fingerprint (rows and a digest) of each partition it checked. The gate reads that record, streams
the checked partitions' fingerprinted columns (`lake.batch_rows` at a time) to make sure they are the partitions
the job checked, runs its Great Expectations suites on the few recorded rows, and reports each failure with the
job's whole count (`with_recorded_counts`). Spark's side of it: `spark_jobs/checks.py`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable

from reki_core.quality.gx import ExpectationOutcome, GateResult
from reki_core.storage.lake import Lake


def row_digest(values: Iterable) -> int:
    """A row's share of a fingerprint (`spark_jobs.checks.fingerprint`): the first 32 bits of the sha256 of its
    non-null values as text (booleans as `true`/`false`, as Spark casts them), joined by a newline."""
    text = [("true" if v else "false") if isinstance(v, bool) else str(v) for v in values if v is not None]
    return int(hashlib.sha256("\n".join(text).encode("utf-8")).hexdigest()[:8], 16)


def partition_fingerprint(lake: Lake, dataset: str, day: dt.date, columns: list[str], batch_rows: int,
                          rows_of=None, day_rows: bool = False) -> dict:
    """rows and digest of `columns` of day D of `dataset` (a keyed one's state; with `day_rows`, only the rows written
    on D), streamed `batch_rows` at a time; `rows_of(batch)` gives a batch's rows as tuples of the fingerprinted
    values (default: `columns` as they are)."""
    rows = digest = 0
    read = lake.read_day_batches if day_rows else lake.read_batches
    for batch in read(dataset, day, columns, batch_rows):
        values = rows_of(batch) if rows_of else zip(*(batch.column(c).to_pylist() for c in columns))
        rows += batch.num_rows
        digest += sum(row_digest(v) for v in values)
    return {"rows": rows, "digest": digest}


def recorded_checks(lake: Lake, day: dt.date, step: str, keys: tuple[str, ...] = ()) -> dict | None:
    """The `checks` of step `step` of day D, where that step succeeded and recorded them with every one of `keys`
    (a record of an older version of the job, without them, is none: the job must run again)."""
    record = lake.read_json(f"_runs/dt={day.isoformat()}/{step}.json") or {}
    checks = record.get("checks") if record.get("success") else None
    return checks if checks is not None and set(keys) <= checks.keys() else None


def no_checks(gate: str, dataset: str, day: dt.date, step: str, task: str) -> GateResult:
    """Raises: the job `step` recorded no checks for the day."""
    outcome = ExpectationOutcome(f"{step}_job_recorded_its_checks", None, {"record": f"_runs/dt={day}/{step}.json"},
                                 False, observed_value=f"no successful {step} step with this version's checks for "
                                                       f"the day: run the {task} task first")
    return GateResult(gate, dataset, 0, [outcome]).raise_if_failed()


def same_partition(dataset: str, found: dict, recorded: dict, step: str, task: str) -> ExpectationOutcome:
    """The outcome of comparing a partition's fingerprint now (`found`) with the one job `step` recorded."""
    same = found == recorded
    return ExpectationOutcome(
        f"partition_is_the_one_the_{step}_job_checked", None, {"dataset": dataset, "recorded": recorded}, same,
        observed_value=None if same else {**found, "hint": f"{dataset} was rewritten after the job checked it: "
                                                           f"re-run the {task} task"})


def with_recorded_counts(result: GateResult, rules: dict[str, tuple[str, str | None]], failed: dict[str, int],
                         totals: dict[str, int] | None = None) -> GateResult:
    """Each failed expectation's unexpected count: the job's count over the whole partition (`failed`, by rule; `rules`
    maps a rule to the expectation and column that state it), not the sample's. An expectation with `mostly` is
    judged again on the whole: `totals[rule]` rows, `failed[rule]` of them unexpected."""
    rule_of = {value: name for name, value in rules.items()}
    for outcome in result.outcomes:
        rule = rule_of.get((outcome.expectation, outcome.column))
        if rule is None:
            continue
        mostly = outcome.kwargs.get("mostly")
        if mostly is not None and totals is not None and rule in totals:
            n, bad = int(totals[rule]), int(failed.get(rule, 0))
            outcome.success = n == 0 or (n - bad) / n >= float(mostly)
            outcome.unexpected_count = bad
        elif not outcome.success and rule in failed:
            outcome.unexpected_count = int(failed[rule])
    return result
