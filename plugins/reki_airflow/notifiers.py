"""On-call alerts from Airflow: task failures (after the last retry), quality-gate failures, publish deadline.

Channels are Airflow connections named in `cfg.alerts`; each one that exists is used, several at once:

- Slack incoming webhook: conn type `slackwebhook`, password = the webhook token (`/T…/B…/…`) or the
  whole webhook URL; host overrides `https://hooks.slack.com/services` (used by the tests).
- SMTP e-mail: conn type `smtp` (provider apache-airflow-providers-smtp), recipients `cfg.alerts.email_to`;
  extras `from_email`, `disable_ssl`, `disable_tls`, `retry_limit`, `timeout`.
- Generic JSON webhook: conn type `http`; host is the full URL to POST to (or host+port+schema);
  other extras are sent as HTTP headers (e.g. `{"Authorization": "Bearer …"}`).

A missing connection is skipped quietly; a channel that fails is logged and the others still send.
Message texts come from `reki_core.alerts` (pure); secrets are redacted from every text.

Use in a DAG (task-level callbacks; DAG-level callbacks fail under `airflow dags test` in 3.3):

    default_args = {"retries": 2, "on_failure_callback": failure_notifier(cfg)}
    DAG(..., deadline=publish_deadline_alert(cfg))
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseNotifier

from reki_core import alerts as alert_messages

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10


@dataclass(frozen=True)
class AlertChannels:
    """Which Airflow connections to try, and who gets the e-mails."""

    slack_conn_id: str | None = None
    smtp_conn_id: str | None = None
    webhook_conn_id: str | None = None
    email_to: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_config(cls, cfg=None) -> "AlertChannels":
        if cfg is None:
            from reki_core.config import load_config

            cfg = load_config()
        a = cfg.alerts
        return cls(a.slack_conn_id or None, a.smtp_conn_id or None, a.webhook_conn_id or None, tuple(a.email_to))

    def as_kwargs(self) -> dict[str, Any]:
        return {"slack_conn_id": self.slack_conn_id, "smtp_conn_id": self.smtp_conn_id,
                "webhook_conn_id": self.webhook_conn_id, "email_to": list(self.email_to)}


# ---------------------------------------------------------------- sending


def _connection_exists(conn_id: str | None) -> bool:
    if not conn_id:
        return False
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return False
    return True


def _send_slack(conn_id: str, alert: dict[str, Any]) -> None:
    from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook

    SlackWebhookHook(slack_webhook_conn_id=conn_id, timeout=SEND_TIMEOUT_S).send(**alert_messages.render_slack(alert))


def _send_email(conn_id: str, to: Iterable[str], alert: dict[str, Any]) -> None:
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    message = alert_messages.render_email(alert)
    with SmtpHook(smtp_conn_id=conn_id) as hook:
        hook.send_email_smtp(to=list(to), subject=message["subject"], html_content=message["html"])


def _send_webhook(conn_id: str, alert: dict[str, Any]) -> None:
    from airflow.providers.http.hooks.http import HttpHook

    HttpHook(method="POST", http_conn_id=conn_id).run(
        endpoint=None, json=alert_messages.render_webhook(alert),
        headers={"Content-Type": "application/json"}, extra_options={"timeout": SEND_TIMEOUT_S})


def send_alert(alert: dict[str, Any], channels: AlertChannels, secrets: Iterable[str] = ()) -> dict[str, str]:
    """Send `alert` on every channel whose connection exists; returns channel -> 'sent' / 'skipped: …' / 'failed: …'."""
    secrets = list(secrets)
    plan = [
        ("slack", channels.slack_conn_id, lambda c: _send_slack(c, alert)),
        ("email", channels.smtp_conn_id, lambda c: _send_email(c, channels.email_to, alert)),
        ("webhook", channels.webhook_conn_id, lambda c: _send_webhook(c, alert)),
    ]
    results: dict[str, str] = {}
    for channel, conn_id, send in plan:
        if not _connection_exists(conn_id):
            results[channel] = f"skipped: no connection '{conn_id}'" if conn_id else "skipped: not configured"
            continue
        if channel == "email" and not channels.email_to:
            results[channel] = "skipped: alerts.email_to is empty"
            log.warning("alert not e-mailed: connection '%s' exists but alerts.email_to is empty", conn_id)
            continue
        try:
            send(conn_id)
            results[channel] = "sent"
        except Exception as exc:  # noqa: BLE001 - one broken channel must not silence the others
            reason = alert_messages.redact(f"{type(exc).__name__}: {exc}", secrets)
            results[channel] = f"failed: {reason}"
            log.error("alert channel %s (connection '%s') failed: %s", channel, conn_id, reason)
    sent = [c for c, r in results.items() if r == "sent"]
    if sent:
        log.info("alert '%s' sent via %s", alert["title"], ", ".join(sent))
    elif any(r.startswith("failed") for r in results.values()):
        log.error("alert '%s' could not be sent on any channel: %s", alert["title"], results)
    else:
        log.warning("alert '%s' not sent: no alert connection exists (%s)", alert["title"], results)
    return results


def _secret_values() -> list[str]:
    """Known secret values to redact from alert texts (best effort: an alert must go out anyway)."""
    try:
        from reki_airflow.secrets import collect_secrets

        return list(collect_secrets().values())
    except Exception as exc:  # noqa: BLE001 - the generic patterns in reki_core.alerts.redact still apply
        log.warning("could not collect secrets for redaction: %s", exc)
        return []


# ---------------------------------------------------------------- context -> alert


def _dt_from_context(context: dict[str, Any]) -> str | None:
    """The run's partition date: params/conf 'dt', else the data interval start (as `runtime.partition_date`), else ds."""
    params = context.get("params") or {}
    if params.get("dt"):
        return str(params["dt"])[:10]
    dag_run = context.get("dag_run")
    conf = getattr(dag_run, "conf", None) or {}
    if conf.get("dt"):
        return str(conf["dt"])[:10]
    start = context.get("data_interval_start")
    if isinstance(start, dt.datetime):
        return start.date().isoformat()
    if context.get("ds"):
        return str(context["ds"])
    for attr in ("logical_date", "run_after"):
        value = getattr(dag_run, attr, None)
        if value is not None:
            return value.date().isoformat() if isinstance(value, dt.datetime) else str(value)[:10]
    return None


def _log_url(ti: Any) -> str | None:
    try:
        return getattr(ti, "log_url", None)
    except Exception:  # noqa: BLE001 - log_url reads config; a missing link must not drop the alert
        return None


def alert_from_context(context: dict[str, Any], kind: str, secrets: Iterable[str] = (), **fields: Any) -> dict:
    """Build an alert from an Airflow task context (`ti`, `dag_run`, `params`, `exception`)."""
    ti = context.get("ti") or context.get("task_instance")
    dag = context.get("dag")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag, "dag_id", None) or "unknown-dag"
    exc = context.get("exception")
    if exc is not None and "error" not in fields:
        fields["error"] = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else exc
    return alert_messages.build_alert(
        kind,
        dag_id=dag_id,
        task_id=getattr(ti, "task_id", None),
        run_id=getattr(ti, "run_id", None) or context.get("run_id"),
        dt_value=_dt_from_context(context),
        try_number=getattr(ti, "try_number", None),
        max_tries=getattr(ti, "max_tries", None),
        log_url=_log_url(ti),
        secrets=secrets,
        **fields,
    )


def mark_alerted(exc: BaseException) -> BaseException:
    """Mark a failure whose task already sent its own, more specific alert (a failed gate): the task-failure
    notifier then stays silent for it, so on-call gets one page, not two."""
    exc.reki_alerted = True
    return exc


class RekiNotifier(BaseNotifier):
    """Task-failure notifier: use as `on_failure_callback` (Airflow calls it after the task's last try)."""

    def __init__(self, channels: AlertChannels, report_url: str | None = None):
        super().__init__()
        self.channels = channels
        self.report_url = report_url
        self.last_results: dict[str, str] = {}

    def notify(self, context: dict[str, Any]) -> None:
        if getattr(context.get("exception"), "reki_alerted", False):
            self.last_results = {}  # the task alerted on this failure itself (mark_alerted)
            return
        secrets = _secret_values()
        alert = alert_from_context(context, "task_failed", secrets=secrets, report_url=self.report_url)
        self.last_results = send_alert(alert, self.channels, secrets)


def failure_notifier(cfg=None, report_url: str | None = None) -> RekiNotifier:
    """The notifier for `default_args['on_failure_callback']`, channels from `cfg.alerts`."""
    return RekiNotifier(AlertChannels.from_config(cfg), report_url=report_url)


def notify_gate_failure(
    context: dict[str, Any],
    gate_name: str,
    failing_expectations: Any,
    cfg=None,
    channels: AlertChannels | None = None,
    report_url: str | None = None,
    data_docs_url: str | None = None,
) -> dict[str, str]:
    """Alert on a failed quality gate (call it where the gate task catches `GateError`, then re-raise).

    `failing_expectations`: a `GateResult`, its outcomes, dicts, or `GateResult.summary()["failed"]`.
    Returns channel -> result.
    """
    channels = channels or AlertChannels.from_config(cfg)
    secrets = _secret_values()
    alert = alert_from_context(context, "gate_failed", secrets=secrets, gate_name=gate_name,
                               failing_expectations=failing_expectations, report_url=report_url,
                               data_docs_url=data_docs_url)
    return send_alert(alert, channels, secrets)


# ---------------------------------------------------------------- publish deadline


def on_publish_deadline_missed(
    context: dict[str, Any],
    slack_conn_id: str | None = None,
    smtp_conn_id: str | None = None,
    webhook_conn_id: str | None = None,
    email_to: list[str] | None = None,
    deadline_hours: float | None = None,
    skip_run_types: list[str] | None = None,
) -> dict[str, str]:
    """Deadline-alert callback (Airflow runs it through the executor when the run is late).

    `context` is what Airflow 3.3 sends for a missed deadline: {"dag_run": <DAGRunResponse JSON>,
    "deadline": {"id", "deadline_time"}}. Backfill runs are skipped: their dates are past by design.
    """
    dag_run = context.get("dag_run") or {}
    run_type = str(dag_run.get("run_type") or "")
    if run_type in (skip_run_types if skip_run_types is not None else ["backfill"]):
        log.info("publish deadline missed by %s run %s: no alert for this run type", run_type, dag_run.get("dag_run_id"))
        return {}
    conf = dag_run.get("conf") or {}
    day = conf.get("dt") or str(dag_run.get("logical_date") or dag_run.get("run_after") or "")[:10] or None
    deadline = context.get("deadline") or {}
    secrets = _secret_values()
    alert = alert_messages.build_alert(
        "deadline_missed",
        dag_id=dag_run.get("dag_id") or "unknown-dag",
        run_id=dag_run.get("dag_run_id"),
        dt_value=day,
        deadline_time=str(deadline.get("deadline_time")) if deadline.get("deadline_time") else None,
        deadline_hours=deadline_hours,
        error=f"run state is '{dag_run.get('state')}' at the deadline",
        secrets=secrets,
    )
    channels = AlertChannels(slack_conn_id, smtp_conn_id, webhook_conn_id, tuple(email_to or ()))
    return send_alert(alert, channels, secrets)


def publish_deadline_alert(cfg=None, logical_date_to_interval_end: dt.timedelta = dt.timedelta(days=1)):
    """A DAG-level `DeadlineAlert`: alert when a run has not succeeded by interval end + publish_deadline_hours.

    Airflow 3.3 creates the deadline when the run is created and drops it when the run succeeds (the
    last task publishes), so only late or failed runs alert. The reference is the run's logical
    date; the default 1 day fits the daily `CronDataIntervalTimetable` (logical date = interval
    start); pass `timedelta(0)` for `CronTriggerTimetable` (Airflow 3's `@daily`: logical date = run time).
    """
    from airflow.sdk import DeadlineAlert, DeadlineReference, SyncCallback

    if cfg is None:
        from reki_core.config import load_config

        cfg = load_config()
    hours = cfg.alerts.publish_deadline_hours
    kwargs = {**AlertChannels.from_config(cfg).as_kwargs(), "deadline_hours": hours}
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
        interval=logical_date_to_interval_end + dt.timedelta(hours=hours),
        callback=SyncCallback(on_publish_deadline_missed, kwargs=kwargs),
        name="reki-publish-deadline",
    )
