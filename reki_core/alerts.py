"""Alert messages for on-call: one JSON-able alert dict, rendered for Slack, e-mail and a generic webhook.

Pure functions, no Airflow import: `plugins/reki_airflow/notifiers.py` fills `build_alert` from the
task context and sends the renderings through Airflow connections. Every free text that goes into
an alert (error messages, expectation details, links) passes through `redact`, so credentials that
leak into an exception message never reach a chat channel or a mailbox.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterable
from typing import Any

ALERT_SCHEMA = "reki.alert/v1"
KINDS = ("task_failed", "gate_failed", "deadline_missed")
MAX_ERROR_CHARS = 2000
MAX_LISTED_EXPECTATIONS = 20
REDACTED = "***"

# Credential shapes that can show up inside error texts and URLs.
_SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # scheme://user:password@host
    (re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]+:)[^/\s@]+(?=@)"), r"\g<pre>" + REDACTED),
    # key=value / "key": "value" for secret-looking keys
    (re.compile(
        r"(?i)(?P<pre>\b[\w\-]*(?:password|passwd|secret|token|api[_\-]?key|access[_\-]?key|signature|credential)s?"
        r"[\"']?\s*[:=]\s*[\"']?)(?P<val>[^\s\"',;&}]+)"),
     r"\g<pre>" + REDACTED),
    (re.compile(r"(?i)\b(?P<pre>bearer\s+)[A-Za-z0-9._~+/\-]+=*"), r"\g<pre>" + REDACTED),
    (re.compile(r"(?i)(?P<pre>hooks\.slack\.com/services/)\S+"), r"\g<pre>" + REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
]


def redact(text: Any, secrets: Iterable[str] = ()) -> str:
    """`text` as a string with known secret values and credential-looking fragments replaced by ***."""
    out = "" if text is None else str(text)
    # Longest first so a secret that contains another is replaced whole.
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        out = out.replace(secret, REDACTED)
    for pattern, replacement in _SECRET_PATTERNS:
        out = pattern.sub(replacement, out)
    return out


_TRUNCATED = " ... (truncated)"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


_UNEXPECTED_RE = re.compile(r"(\d+) unexpected")


def normalise_expectations(failing: Any, secrets: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Failing expectations as dicts {expectation, column, unexpected_count, detail}.

    Accepts a `GateResult` (its failing outcomes), `ExpectationOutcome`s, dicts, or the description
    strings of `GateResult.summary()["failed"]`.
    """
    if failing is None:
        return []
    if hasattr(failing, "failed") and not isinstance(failing, (list, tuple, dict, str)):
        failing = failing.failed
    if isinstance(failing, (str, dict)):
        failing = [failing]
    items = []
    for entry in failing:
        if isinstance(entry, str):
            count = _UNEXPECTED_RE.search(entry)
            item = {"expectation": entry.split(" ", 1)[0], "column": None,
                    "unexpected_count": int(count.group(1)) if count else None, "detail": entry}
        elif isinstance(entry, dict):
            item = {"expectation": entry.get("expectation") or entry.get("type") or "expectation",
                    "column": entry.get("column"),
                    "unexpected_count": entry.get("unexpected_count"),
                    "detail": entry.get("detail") or entry.get("description") or ""}
        elif hasattr(entry, "describe"):
            item = {"expectation": entry.expectation, "column": entry.column,
                    "unexpected_count": entry.unexpected_count, "detail": entry.describe()}
        else:
            raise TypeError(f"failing expectation of unsupported type {type(entry).__name__}: {entry!r}")
        item["detail"] = _truncate(redact(item["detail"], secrets), 500)
        items.append(item)
    return items


def build_alert(
    kind: str,
    *,
    dag_id: str,
    task_id: str | None = None,
    run_id: str | None = None,
    dt_value: str | dt.date | None = None,
    try_number: int | None = None,
    max_tries: int | None = None,
    log_url: str | None = None,
    report_url: str | None = None,
    data_docs_url: str | None = None,
    error: Any = None,
    gate_name: str | None = None,
    failing_expectations: Any = None,
    deadline_time: str | dt.datetime | None = None,
    deadline_hours: float | None = None,
    secrets: Iterable[str] = (),
) -> dict[str, Any]:
    """One alert as a JSON-able dict; `secrets` are values to blank out wherever they appear."""
    if kind not in KINDS:
        raise ValueError(f"alert kind '{kind}' is not one of {KINDS}")
    secrets = list(secrets)
    day = dt_value.isoformat() if isinstance(dt_value, (dt.date, dt.datetime)) else dt_value
    where = f"{dag_id}.{task_id}" if task_id else dag_id
    gate = None
    if kind == "gate_failed":
        failing = normalise_expectations(failing_expectations, secrets)
        gate = {
            "name": gate_name or "unnamed gate",
            "failed_count": len(failing),
            "unexpected_total": sum(f["unexpected_count"] or 0 for f in failing),
            "failing": failing[:MAX_LISTED_EXPECTATIONS],
            "more_not_listed": max(0, len(failing) - MAX_LISTED_EXPECTATIONS),
        }
        title = f"Quality gate '{gate['name']}' failed in {where} for dt={day}: {len(failing)} expectation(s) failed"
    elif kind == "task_failed":
        tries = ""
        if try_number:
            tries = f" after try {try_number}" + (f" of {max_tries + 1}" if max_tries is not None else "")
        title = f"Task {where} failed for dt={day}{tries}"
    else:
        title = f"DAG {dag_id} has not published dt={day} by its deadline"
    deadline = None
    if kind == "deadline_missed":
        when = deadline_time.isoformat() if isinstance(deadline_time, dt.datetime) else deadline_time
        deadline = {"deadline_time": when, "hours_after_interval_end": deadline_hours}
    return {
        "schema": ALERT_SCHEMA,
        "kind": kind,
        "severity": "error",
        "title": redact(title, secrets),
        "dag_id": dag_id,
        "task_id": task_id,
        "run_id": run_id,
        "dt": day,
        "try_number": try_number,
        "max_tries": max_tries,
        "log_url": redact(log_url, secrets) if log_url else None,
        "report_url": redact(report_url, secrets) if report_url else None,
        "data_docs_url": redact(data_docs_url, secrets) if data_docs_url else None,
        "error": _truncate(redact(error, secrets), MAX_ERROR_CHARS) if error is not None else None,
        "gate": gate,
        "deadline": deadline,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- renderers


def _facts(alert: dict[str, Any]) -> list[tuple[str, str]]:
    """The labelled fields every rendering shows, in one order."""
    facts = [("DAG", alert["dag_id"]), ("Task", alert.get("task_id")), ("dt", alert.get("dt")),
             ("Run", alert.get("run_id"))]
    if alert.get("try_number"):
        tries = str(alert["try_number"])
        if alert.get("max_tries") is not None:
            tries += f" of {alert['max_tries'] + 1}"
        facts.append(("Try", tries))
    if alert.get("deadline"):
        facts.append(("Deadline", str(alert["deadline"]["deadline_time"])))
    return [(k, str(v)) for k, v in facts if v not in (None, "")]


def _expectation_lines(alert: dict[str, Any]) -> list[str]:
    gate = alert.get("gate")
    if not gate:
        return []
    lines = []
    for f in gate["failing"]:
        count = f" ({f['unexpected_count']} unexpected)" if f.get("unexpected_count") is not None else ""
        column = f" on column '{f['column']}'" if f.get("column") else ""
        lines.append(f"{f['expectation']}{column}{count}: {f['detail']}")
    if gate["more_not_listed"]:
        lines.append(f"... and {gate['more_not_listed']} more")
    return lines


def render_text(alert: dict[str, Any]) -> str:
    """Plain text (e-mail body, Slack fallback, logs)."""
    lines = [alert["title"], ""]
    lines += [f"{k}: {v}" for k, v in _facts(alert)]
    if alert.get("gate"):
        lines += ["", f"Failing expectations ({alert['gate']['failed_count']}, "
                      f"{alert['gate']['unexpected_total']} unexpected values):"]
        lines += [f"  - {line}" for line in _expectation_lines(alert)]
    if alert.get("error"):
        lines += ["", "Error:", alert["error"]]
    if alert.get("log_url"):
        lines += ["", f"Log: {alert['log_url']}"]
    if alert.get("report_url"):
        lines.append(f"Run report: {alert['report_url']}")
    if alert.get("data_docs_url"):
        lines.append(f"Data Docs: {alert['data_docs_url']}")
    return "\n".join(lines)


def render_slack(alert: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook body: `text` fallback plus Block Kit blocks (within Slack's size limits)."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _truncate(alert["title"], 150)}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in _facts(alert)][:10]},
    ]
    if alert.get("gate"):
        listed = "\n".join(f"• {line}" for line in _expectation_lines(alert))
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _truncate(
            f"*Failing expectations* ({alert['gate']['failed_count']}):\n{listed}", 3000)}})
    if alert.get("error"):
        blocks.append({"type": "section", "text": {"type": "mrkdwn",
                                                   "text": _truncate(f"*Error*\n```{alert['error']}```", 3000)}})
    links = []
    if alert.get("log_url"):
        links.append(f"<{alert['log_url']}|Task log>")
    if alert.get("report_url"):
        links.append(f"<{alert['report_url']}|Run report>")
    if alert.get("data_docs_url"):
        links.append(f"<{alert['data_docs_url']}|Data Docs>")
    if links:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(links)}]})
    return {"text": _truncate(render_text(alert), 3000), "blocks": blocks}


def render_email(alert: dict[str, Any]) -> dict[str, str]:
    """E-mail `subject`, plain `text` and `html` bodies."""
    esc = html.escape
    rows = "".join(f"<tr><th align='left'>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _facts(alert))
    parts = [f"<h2>{esc(alert['title'])}</h2>", f"<table>{rows}</table>"]
    if alert.get("gate"):
        items = "".join(f"<li>{esc(line)}</li>" for line in _expectation_lines(alert))
        parts.append(f"<h3>Failing expectations ({alert['gate']['failed_count']})</h3><ul>{items}</ul>")
    if alert.get("error"):
        parts.append(f"<h3>Error</h3><pre>{esc(alert['error'])}</pre>")
    links = [(label, alert[key]) for label, key in (("Task log", "log_url"), ("Run report", "report_url"),
                                                       ("Data Docs", "data_docs_url"))
             if alert.get(key)]
    if links:
        parts.append("<p>" + " | ".join(f"<a href='{esc(url, quote=True)}'>{esc(label)}</a>" for label, url in links)
                     + "</p>")
    return {"subject": f"[REKI] {_truncate(alert['title'], 180)}", "text": render_text(alert),
            "html": "<html><body>" + "".join(parts) + "</body></html>"}


def render_webhook(alert: dict[str, Any]) -> dict[str, Any]:
    """The generic webhook JSON: the alert itself plus a plain-text summary."""
    return {**alert, "text": render_text(alert)}
