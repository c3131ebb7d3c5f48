"""Great Expectations plumbing shared by every gate: one ephemeral context, one way to run a suite.

A gate is a list of expectations run over a pandas DataFrame, or a Spark one (GX's Spark datasource; Connect
DataFrames included, docs/design.md "Landing in Spark"). `run_suite` returns a `GateResult`
(JSON-able summary: each expectation, success, counts); `GateResult.raise_if_failed()` raises a
`GateError` whose message lists the failing expectations with their counts. The result also holds
GX's own validation results, which `reki_core.quality.data_docs.keep_validations` renders as Data Docs.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

_lock = threading.Lock()
_context = None
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class GateError(RuntimeError):
    """A quality gate failed; `result` holds the full summary."""

    def __init__(self, message: str, result: "GateResult"):
        super().__init__(message)
        self.result = result


@dataclass
class ExpectationOutcome:
    expectation: str
    column: str | None
    kwargs: dict[str, Any]
    success: bool
    unexpected_count: int | None = None
    observed_value: Any = None
    unexpected_sample: list[Any] = field(default_factory=list)
    unexpected_index: list[int] = field(default_factory=list)
    severity: str = "fail"  # "fail" stops the run; "warn" is reported only

    def describe(self) -> str:
        where = f" column '{self.column}'" if self.column else ""
        args = {k: v for k, v in self.kwargs.items() if k not in ("column", "batch_id")}
        detail = []
        if self.unexpected_count is not None:
            detail.append(f"{self.unexpected_count} unexpected")
        if self.observed_value is not None:
            detail.append(f"observed {self.observed_value!r}")
        if self.unexpected_sample:
            detail.append(f"e.g. {self.unexpected_sample[:3]!r}")
        return f"{self.expectation}{where} {args}: " + ", ".join(detail)


@dataclass
class GateResult:
    gate: str
    dataset: str
    rows: int
    outcomes: list[ExpectationOutcome]
    # GX's own results ({"dataset", "validated_at", "result": ExpectationSuiteValidationResult JSON}), one per suite run,
    # kept for the Data Docs; not part of `summary()` (that goes into run records and manifests).
    validations: list[dict[str, Any]] = field(default_factory=list)
    # URI of the run's Data Docs index once they hold this result (for alerts), None until then.
    data_docs: str | None = None

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity == "fail"]

    @property
    def warnings(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity == "warn"]

    @property
    def success(self) -> bool:
        return not self.failed

    def summary(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "dataset": self.dataset,
            "rows": self.rows,
            "success": self.success,
            "evaluated": len(self.outcomes),
            "failed": [o.describe() for o in self.failed],
            "warnings": [o.describe() for o in self.warnings],
        }

    def raise_if_failed(self) -> "GateResult":
        if self.failed:
            lines = "\n".join(f"  - {o.describe()}" for o in self.failed)
            raise GateError(
                f"quality gate '{self.gate}' failed on {self.dataset} ({self.rows} rows): "
                f"{len(self.failed)} of {len(self.outcomes)} expectations failed:\n{lines}",
                self,
            )
        return self


def raise_if_any_failed(results: list[GateResult], what: str) -> None:
    """One GateError for all failing `results`: its message and its `result` (what an alert lists) cover every
    failing dataset, not only the first."""
    failed = [r for r in results if not r.success]
    if not failed:
        return
    messages = []
    for r in failed:
        try:
            r.raise_if_failed()
        except GateError as exc:
            messages.append(str(exc))
    merged = GateResult(failed[0].gate, ", ".join(r.dataset for r in failed), sum(r.rows for r in failed),
                        [o for r in failed for o in r.outcomes], validations=[v for r in failed for v in r.validations],
                        data_docs=failed[0].data_docs)
    raise GateError(f"{what}:\n" + "\n".join(messages), merged)


def warn_only(expectation):
    """Mark an expectation whose failure is reported as a warning instead of stopping the run."""
    expectation.meta = {**(expectation.meta or {}), "severity": "warn"}
    return expectation


def ephemeral_context():
    """A new in-memory GX context without GX's default temporary Data Docs site (one temp folder per context)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import DataContextConfig, InMemoryStoreBackendDefaults

    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False))
    return gx.get_context(project_config=config, mode="ephemeral")


def _get_context():
    global _context
    with _lock:
        if _context is None:
            _context = _quiet(ephemeral_context())
        return _context


def _quiet(ctx):
    try:  # progress bars would flood task logs
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    return ctx


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return value.item()  # numpy scalars
    except AttributeError:
        return str(value)


def offenders(ids: pd.Series, ok) -> pd.Series:
    """`ids` where a row breaks a rule, null where it keeps it: a failing `ExpectColumnValuesToBeNull` then
    names the rows (a true/false column would only say "False")."""
    return ids.astype(str).astype(object).mask(np.asarray(ok, dtype=bool), None)


def safe_name(text: str) -> str:
    """A file- and key-safe form of a name: "raw/items/dt=1998-03-31" -> "raw_items_dt_1998-03-31"."""
    return _UNSAFE.sub("_", text).strip("_")


def suite_name(gate: str, dataset: str) -> str:
    """The GX suite name of a gate on a dataset: "raw" on "raw/items/dt=D" -> "raw.raw_items_dt_D"."""
    return f"{safe_name(gate)}.{safe_name(dataset)}"


def _spark_batch_definition(df):
    """A batch definition for a Spark DataFrame (a Connect one included) in a context of its own: GX's Spark datasource
    finds its session with a global `getOrCreate` (a Connect client's session, made with `create()`, is not that one,
    and a classic fallback would start a JVM in the task), so it is handed the frame's own session; `persist=False`:
    GX would cache the frame on the shared Connect server and never release it."""
    ctx = _quiet(ephemeral_context())
    source = ctx.data_sources.add_spark("reki_spark", persist=False)
    source._spark = df.sparkSession
    return source.add_dataframe_asset("frame").add_batch_definition_whole_dataframe("whole")


def run_suite(
    gate: str,
    dataset: str,
    df,
    expectations: list,
    complete: bool = False,
) -> GateResult:
    """Validate `df` (a pandas DataFrame, or a Spark one: its rows stay in Spark) against `expectations` (gxe.*
    instances); `complete` also returns every unexpected row index (pandas only)."""
    import great_expectations as gx

    ctx = _get_context()
    spark_frame = not isinstance(df, pd.DataFrame)
    if spark_frame and complete:
        raise ValueError("run_suite: unexpected row indexes need a pandas DataFrame (Spark rows have no index)")
    with _lock:
        name = f"{gate}-{dataset}"
        if spark_frame:
            batch_def = _spark_batch_definition(df)
        else:
            try:
                batch_def = ctx.data_sources.get("reki").get_asset(name).get_batch_definition("whole")
            except Exception:  # noqa: BLE001 - first use of this gate in the process
                try:
                    source = ctx.data_sources.get("reki")
                except Exception:  # noqa: BLE001
                    source = ctx.data_sources.add_pandas("reki")
                batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
        suite = gx.ExpectationSuite(name=suite_name(gate, dataset))
        for exp in expectations:
            suite.add_expectation(exp)
        batch = batch_def.get_batch(batch_parameters={"dataframe": df})
        fmt = {"result_format": "COMPLETE"} if complete else {"result_format": "SUMMARY", "partial_unexpected_count": 5}
        validated_at = dt.datetime.now(dt.UTC).isoformat()
        res = batch.validate(suite, result_format=fmt)

    outcomes = []
    for r in res.results:
        config = r.expectation_config
        result = r.result or {}
        kwargs = _json_safe(dict(config.kwargs))
        outcomes.append(
            ExpectationOutcome(
                expectation=config.type,
                column=kwargs.get("column"),
                kwargs=kwargs,
                success=bool(r.success),
                unexpected_count=result.get("unexpected_count"),
                observed_value=_json_safe(result.get("observed_value")),
                unexpected_sample=_json_safe(result.get("partial_unexpected_list") or [])[:5],
                unexpected_index=[int(i) for i in result.get("unexpected_index_list") or []
                                  if isinstance(i, (int,)) or str(i).isdigit()],
                severity=(config.meta or {}).get("severity", "fail"),
            )
        )
    validation = {"dataset": dataset, "validated_at": validated_at, "result": res.to_json_dict()}
    rows = df.count() if spark_frame else len(df)
    return GateResult(gate=gate, dataset=dataset, rows=rows, outcomes=outcomes, validations=[validation])
