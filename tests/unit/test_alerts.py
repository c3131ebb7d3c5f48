"""Alert building and rendering (pure): fields, gate details with counts, redaction, size limits."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from reki_core.alerts import (
    build_alert,
    normalise_expectations,
    redact,
    render_email,
    render_slack,
    render_text,
    render_webhook,
)
from reki_core.quality.gx import ExpectationOutcome, GateResult

LOG_URL = "http://airflow.local/dags/reki_daily/runs/scheduled__2026-01-05/tasks/publish?try_number=3"


def task_alert(**overrides):
    fields = dict(dag_id="reki_daily", task_id="publish", run_id="scheduled__2026-01-05", dt_value=dt.date(2026, 1, 5),
                  try_number=3, max_tries=2, log_url=LOG_URL, error="RuntimeError: S3 upload failed")
    fields.update(overrides)
    return build_alert("task_failed", **fields)


def gate_result() -> GateResult:
    return GateResult(gate="raw_interactions", dataset="raw/interactions", rows=1000, outcomes=[
        ExpectationOutcome("expect_column_values_to_not_be_null", "user_id", {"column": "user_id"}, False,
                           unexpected_count=12, unexpected_sample=[None]),
        ExpectationOutcome("expect_column_values_to_be_between", "rating", {"column": "rating", "min_value": 1,
                                                                             "max_value": 5}, False, unexpected_count=3),
        ExpectationOutcome("expect_column_values_to_be_unique", "event_id", {"column": "event_id"}, False,
                           unexpected_count=40, severity="warn"),
        ExpectationOutcome("expect_table_row_count_to_be_between", None, {"min_value": 1}, True, observed_value=1000),
    ])


def test_task_alert_carries_dag_task_dt_try_and_log_link():
    alert = task_alert()
    assert alert["kind"] == "task_failed"
    assert alert["title"] == "Task reki_daily.publish failed for dt=2026-01-05 after try 3 of 3"
    assert (alert["dag_id"], alert["task_id"], alert["dt"], alert["try_number"]) == ("reki_daily", "publish",
                                                                                     "2026-01-05", 3)
    assert alert["log_url"] == LOG_URL and alert["gate"] is None
    text = render_text(alert)
    for expected in ("DAG: reki_daily", "Task: publish", "dt: 2026-01-05", "Try: 3 of 3", f"Log: {LOG_URL}",
                     "RuntimeError: S3 upload failed"):
        assert expected in text
    json.dumps(render_webhook(alert))  # the webhook body is plain JSON


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="alert kind 'oops'"):
        build_alert("oops", dag_id="d")


def test_gate_alert_lists_only_failing_expectations_with_counts():
    alert = build_alert("gate_failed", dag_id="reki_daily", task_id="gate_raw", dt_value="2026-01-05",
                        gate_name="raw_interactions", failing_expectations=gate_result())
    gate = alert["gate"]
    # The warn-only failure and the passing expectation are not listed.
    assert [(f["expectation"], f["column"], f["unexpected_count"]) for f in gate["failing"]] == [
        ("expect_column_values_to_not_be_null", "user_id", 12),
        ("expect_column_values_to_be_between", "rating", 3),
    ]
    assert gate["failed_count"] == 2 and gate["unexpected_total"] == 15
    assert alert["title"] == ("Quality gate 'raw_interactions' failed in reki_daily.gate_raw for dt=2026-01-05: "
                              "2 expectation(s) failed")
    slack_text = json.dumps(render_slack(alert)["blocks"])
    assert "expect_column_values_to_not_be_null on column 'user_id' (12 unexpected)" in slack_text


def test_gate_alert_links_the_run_data_docs_in_every_channel():
    docs = "file:///lake/_runs/dt=2026-01-05/data_docs/index.html"
    alert = build_alert("gate_failed", dag_id="reki_daily", task_id="gate_raw", dt_value="2026-01-05",
                        gate_name="raw_interactions", failing_expectations=gate_result(), data_docs_url=docs)
    assert f"Data Docs: {docs}" in render_text(alert)
    assert f"<{docs}|Data Docs>" in json.dumps(render_slack(alert))
    assert docs in render_email(alert)["html"] and render_webhook(alert)["data_docs_url"] == docs


def test_gate_expectations_accepted_as_summary_strings_and_dicts():
    summary_lines = gate_result().summary()["failed"]
    from_strings = normalise_expectations(summary_lines)
    assert [f["unexpected_count"] for f in from_strings] == [12, 3]
    assert from_strings[0]["expectation"] == "expect_column_values_to_not_be_null"
    from_dicts = normalise_expectations([{"expectation": "expect_x", "column": "c", "unexpected_count": 5}])
    assert from_dicts == [{"expectation": "expect_x", "column": "c", "unexpected_count": 5, "detail": ""}]
    with pytest.raises(TypeError, match="unsupported type int"):
        normalise_expectations([42])


def test_long_gate_lists_are_capped_and_say_how_many_more():
    failing = [{"expectation": f"expect_{i}", "unexpected_count": 1} for i in range(25)]
    alert = build_alert("gate_failed", dag_id="d", gate_name="g", failing_expectations=failing)
    assert len(alert["gate"]["failing"]) == 20 and alert["gate"]["more_not_listed"] == 5
    assert alert["gate"]["failed_count"] == 25
    assert "... and 5 more" in render_text(alert)


def test_redact_blanks_known_values_and_credential_shapes():
    text = ("connect http://admin:hunter2pass@db.local:5432 failed; aws_secret_access_key=AbC/123+xyz "
            "token: 'tok-998877' Authorization: Bearer eyJhbGciOi.payload.sig key AKIAABCDEFGHIJKLMNOP "
            "https://hooks.slack.com/services/T1/B2/zzz and my-known-value-42")
    out = redact(text, secrets=["my-known-value-42"])
    for leaked in ("hunter2pass", "AbC/123+xyz", "tok-998877", "eyJhbGciOi", "AKIAABCDEFGHIJKLMNOP", "T1/B2/zzz",
                   "my-known-value-42"):
        assert leaked not in out, leaked
    assert "http://admin:***@db.local:5432" in out
    assert "rows=12 passed" == redact("rows=12 passed")  # ordinary text is untouched


def test_no_rendering_leaks_a_secret_from_the_error_or_expectations():
    secret = "s3-secret-Zx81Qw"
    alert = build_alert("gate_failed", dag_id="reki_daily", task_id="gate", dt_value="2026-01-05",
                        gate_name="publish", error=f"SignatureDoesNotMatch for {secret}",
                        failing_expectations=[f"expect_x column 'c' {{}}: 3 unexpected, e.g. ['{secret}']"],
                        log_url=f"http://user:{secret}@airflow.local/log", secrets=[secret])
    renderings = json.dumps([render_webhook(alert), render_slack(alert), render_email(alert)])
    assert secret not in renderings
    assert "***" in alert["error"] and "***" in alert["gate"]["failing"][0]["detail"]


def test_email_escapes_hostile_text_and_slack_respects_size_limits():
    hostile = "<script>alert(1)</script>" + "x" * 5000
    alert = task_alert(error=hostile, task_id="t" * 300)
    mail = render_email(alert)
    assert "<script>" not in mail["html"] and "&lt;script&gt;" in mail["html"]
    assert mail["subject"].startswith("[REKI] Task reki_daily.") and len(mail["subject"]) <= 200
    slack = render_slack(alert)
    assert len(slack["blocks"][0]["text"]["text"]) <= 150  # Slack header limit
    assert all(len(b["text"]["text"]) <= 3000 for b in slack["blocks"] if b["type"] == "section" and "text" in b)
    assert len(slack["text"]) <= 3000
    assert len(alert["error"]) <= 2000 and alert["error"].endswith("(truncated)")


def test_deadline_alert_names_the_deadline():
    alert = build_alert("deadline_missed", dag_id="reki_daily", dt_value="2026-01-05",
                        deadline_time=dt.datetime(2026, 1, 6, 6, tzinfo=dt.UTC), deadline_hours=6.0)
    assert alert["title"] == "DAG reki_daily has not published dt=2026-01-05 by its deadline"
    assert alert["deadline"] == {"deadline_time": "2026-01-06T06:00:00+00:00", "hours_after_interval_end": 6.0}
    assert "Deadline: 2026-01-06T06:00:00+00:00" in render_text(alert)
