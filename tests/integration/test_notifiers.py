"""Alerts reach real local receivers: an SMTP server (aiosmtpd) and HTTP webhook receivers on 127.0.0.1.

The first test fails a real task under `airflow dags test` (retries=1) with the notifier as
`on_failure_callback`; the others call the notifier helpers with hand-built contexts (the unit seam).
Airflow connections come from `AIRFLOW_CONN_<ID>` variables in JSON form.
"""

from __future__ import annotations

import datetime as dt
import email
import json
import os
import secrets as pysecrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from reki_core.config import PROJECT_ROOT

# Airflow reads its home at import: keep this process's config out of ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="reki-airflow-home-"))
PLUGINS = PROJECT_ROOT / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))  # what Airflow does for its plugins folder
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- receivers


class HttpReceiver:
    """Records every POST (path, headers, JSON body); answers 200 'ok' like Slack does."""

    def __init__(self):
        self.requests: list[dict] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def on(self, path_prefix: str) -> list[dict]:
        return [r for r in self.requests if r["path"].startswith(path_prefix)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class SmtpReceiver:
    """A real SMTP server (aiosmtpd) keeping every message it accepts."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list[dict] = []
        messages = self.messages

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd naming
                messages.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                                 "message": email.message_from_bytes(envelope.content, policy=policy.default)})
                return "250 Message accepted"

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self):
        self.controller.stop()


@pytest.fixture
def http_receiver():
    receiver = HttpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def smtp_receiver():
    receiver = SmtpReceiver()
    yield receiver
    receiver.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLACK_TOKEN_PATH = "/services/T0REKI/B0REKI/slacktokensecretvalue"
WEBHOOK_BEARER = "Bearer whk-secret-0123456789"
EMAIL_TO = ["oncall@example.com", "data-eng@example.com"]


def connection_env(http: HttpReceiver | None, smtp: SmtpReceiver | None, slack_port: int | None = None) -> dict:
    env = {}
    if http is not None or slack_port is not None:
        port = slack_port or http.port
        env["AIRFLOW_CONN_REKI_SLACK"] = json.dumps(
            {"conn_type": "slackwebhook", "host": f"http://127.0.0.1:{port}", "password": SLACK_TOKEN_PATH})
    if http is not None:
        env["AIRFLOW_CONN_REKI_WEBHOOK"] = json.dumps(
            {"conn_type": "http", "host": f"http://127.0.0.1:{http.port}/hooks/reki",
             "extra": {"Authorization": WEBHOOK_BEARER}})
    if smtp is not None:
        env["AIRFLOW_CONN_REKI_SMTP"] = json.dumps(
            {"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
             "extra": {"from_email": "reki@example.com", "disable_ssl": True, "disable_tls": True,
                       "retry_limit": 0, "timeout": 10}})
    return env


def email_body(message) -> str:
    part = message.get_body(preferencelist=("html", "plain"))
    return part.get_content()


# ---------------------------------------------------------------- through a real task failure

PROBE_DAG = textwrap.dedent('''
    import datetime as dt
    import logging
    import os

    from airflow.sdk import DAG, task
    from reki_airflow.notifiers import failure_notifier
    from reki_airflow.secrets import register_secrets_for_masking

    with DAG("reki_alert_probe", schedule=None, catchup=False,
             default_args={"retries": 1, "retry_delay": dt.timedelta(seconds=0),
                           "on_failure_callback": failure_notifier()}):

        @task
        def land_raw():
            names = register_secrets_for_masking()
            print("MASKED NAMES", names)
            key = os.environ["OPENAI_API_KEY"]
            logging.getLogger("reki.probe").info("PROBE calling the LLM endpoint with key %s", key)
            print(f"PROBE printed key {key}")
            raise RuntimeError(f"upstream refused the request made with key {key}")

        land_raw()
''')


@pytest.mark.slow
def test_task_failure_alerts_every_channel_after_last_retry(tmp_path, http_receiver, smtp_receiver):
    api_key = "sk-reki-" + pysecrets.token_hex(12)
    home, dags = tmp_path / "airflow", tmp_path / "dags"
    dags.mkdir()
    (dags / "probe.py").write_text(PROBE_DAG)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "REKI__"))},
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        # As infra/env.sh: reki_airflow from PYTHONPATH, Airflow's plugins folder empty (it would import every file
        # of plugins/ under its bare name, and register the reki plugin a second time beside its entry point).
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(tmp_path / "airflow-plugins"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        "REKI__PATHS__STATE_DIR": str(tmp_path / "state"),
        "REKI__ALERTS__EMAIL_TO": json.dumps(EMAIL_TO),
        "OPENAI_API_KEY": api_key,
        **connection_env(http_receiver, smtp_receiver),
    }
    migrate = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=env, capture_output=True,
                             text=True, timeout=180)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    run = subprocess.run([str(VENV_BIN / "airflow"), "dags", "test", "reki_alert_probe", "2026-01-05"],
                         env=env, capture_output=True, text=True, timeout=240)
    output = run.stdout + run.stderr
    (tmp_path / "dags_test.log").write_text(output)  # kept for diagnosis when an assertion fails
    assert "upstream refused the request" in output, output[-4000:]
    assert run.returncode != 0, "the probe DAG must fail"

    # The task registered its secrets for masking (the masked log itself: test_log_masking.py;
    # `dags test` prints task output to the console without the supervisor's masking).
    assert "MASKED NAMES ['env OPENAI_API_KEY']" in output

    # One alert per channel, after the last try (retries=1: try 2 of 2), none after the first try.
    slack = http_receiver.on("/services/")
    hooks = http_receiver.on("/hooks/reki")
    assert len(slack) == 1 and len(hooks) == 1 and len(smtp_receiver.messages) == 1, (slack, hooks, output[-3000:])

    alert = hooks[0]["body"]
    assert hooks[0]["headers"]["Authorization"] == WEBHOOK_BEARER
    assert alert["kind"] == "task_failed"
    assert (alert["dag_id"], alert["task_id"], alert["dt"]) == ("reki_alert_probe", "land_raw", "2026-01-05")
    assert alert["try_number"] == 2 and alert["max_tries"] == 1
    assert "/dags/reki_alert_probe/runs/" in alert["log_url"] and "tasks/land_raw" in alert["log_url"]
    assert alert["error"].startswith("RuntimeError: upstream refused the request made with key ***")

    slack_body = slack[0]["body"]
    assert slack[0]["path"] == SLACK_TOKEN_PATH
    assert slack_body["blocks"][0]["text"]["text"] == "Task reki_alert_probe.land_raw failed for dt=2026-01-05 after try 2 of 2"
    assert any("<http" in e["text"] and "|Task log>" in e["text"]
               for b in slack_body["blocks"] if b["type"] == "context" for e in b["elements"])

    mail = smtp_receiver.messages[0]
    assert sorted(mail["to"]) == sorted(EMAIL_TO)
    assert mail["message"]["Subject"] == "[REKI] Task reki_alert_probe.land_raw failed for dt=2026-01-05 after try 2 of 2"
    body = email_body(mail["message"])
    assert "land_raw" in body and "2026-01-05" in body and "tasks/land_raw" in body

    everything = json.dumps([r["body"] for r in http_receiver.requests]) + "".join(
        m["message"].as_string() for m in smtp_receiver.messages)
    assert api_key not in everything


# ---------------------------------------------------------------- hand-built contexts (unit seam)


class FakeTI:
    dag_id = "reki_daily"
    task_id = "gate_raw"
    run_id = "scheduled__2026-01-05T00:00:00+00:00"
    try_number = 3
    max_tries = 2
    log_url = "http://airflow.local/dags/reki_daily/runs/scheduled__2026-01-05/tasks/gate_raw?try_number=3"


def test_missing_connections_are_skipped_and_a_broken_channel_does_not_stop_the_others(monkeypatch, http_receiver):
    from reki_airflow.notifiers import AlertChannels, RekiNotifier

    # Slack points at a closed port (broken), the webhook works, SMTP has no connection at all.
    env = connection_env(http_receiver, None, slack_port=closed_port())
    env["AIRFLOW_CONN_REKI_SLACK"] = json.dumps(
        {"conn_type": "slackwebhook", "host": f"http://127.0.0.1:{closed_port()}", "password": SLACK_TOKEN_PATH})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AIRFLOW_CONN_REKI_SMTP", raising=False)

    notifier = RekiNotifier(AlertChannels("reki_slack", "reki_smtp", "reki_webhook", ("oncall@example.com",)))
    notifier({"ti": FakeTI(), "ds": "2026-01-05", "params": {}, "exception": ValueError("bad row count")})

    results = notifier.last_results
    assert results["slack"].startswith("failed: ")
    assert results["email"] == "skipped: no connection 'reki_smtp'"
    assert results["webhook"] == "sent"
    (hook,) = http_receiver.on("/hooks/reki")
    assert hook["body"]["error"] == "ValueError: bad row count"
    assert hook["body"]["try_number"] == 3 and hook["body"]["dt"] == "2026-01-05"
    assert "slacktokensecretvalue" not in results["slack"]


def test_a_failure_its_task_already_alerted_on_pages_once(monkeypatch, http_receiver):
    """A failed gate sends its own alert and marks the exception: the task-failure callback stays silent."""
    from reki_airflow.notifiers import AlertChannels, RekiNotifier, mark_alerted

    for key, value in connection_env(http_receiver, None).items():
        monkeypatch.setenv(key, value)
    notifier = RekiNotifier(AlertChannels("reki_slack", "reki_smtp", "reki_webhook", ()))
    notifier({"ti": FakeTI(), "ds": "2026-01-05", "params": {}, "exception": mark_alerted(ValueError("gate failed"))})
    assert notifier.last_results == {} and http_receiver.on("/hooks/reki") == []
    notifier({"ti": FakeTI(), "ds": "2026-01-05", "params": {}, "exception": ValueError("task crashed")})
    assert notifier.last_results["webhook"] == "sent" and len(http_receiver.on("/hooks/reki")) == 1


def test_gate_failure_alert_lists_failing_expectations_with_counts(monkeypatch, http_receiver, smtp_receiver):
    import great_expectations.expectations as gxe

    from reki_airflow.notifiers import AlertChannels, notify_gate_failure
    from reki_core.quality.gx import run_suite

    for key, value in connection_env(http_receiver, smtp_receiver).items():
        monkeypatch.setenv(key, value)
    df = pd.DataFrame({"user_id": ["u1", "u2", None, "u4"], "rating": [1, 7, 3, 9]})
    result = run_suite("raw_interactions", "raw/interactions", df, [
        gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
        gxe.ExpectColumnValuesToBeBetween(column="rating", min_value=1, max_value=5),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, max_value=100),
    ])
    assert not result.success

    # The partition is the data interval start (as reki_airflow.runtime.partition_date), not ds.
    context = {"ti": FakeTI(), "ds": "2026-01-06", "data_interval_start": dt.datetime(2026, 1, 5, tzinfo=dt.UTC)}
    results = notify_gate_failure(context, "raw_interactions", result,
                                  channels=AlertChannels("reki_slack", "reki_smtp", "reki_webhook", ("oncall@example.com",)))
    assert results == {"slack": "sent", "email": "sent", "webhook": "sent"}

    gate = http_receiver.on("/hooks/reki")[0]["body"]["gate"]
    counts = {(f["expectation"], f["column"]): f["unexpected_count"] for f in gate["failing"]}
    assert counts == {("expect_column_values_to_not_be_null", "user_id"): 1,
                      ("expect_column_values_to_be_between", "rating"): 2}
    assert gate["failed_count"] == 2 and gate["unexpected_total"] == 3

    slack_text = json.dumps(http_receiver.on("/services/")[0]["body"]["blocks"])
    assert "expect_column_values_to_be_between on column 'rating' (2 unexpected)" in slack_text
    mail = smtp_receiver.messages[0]["message"]
    assert mail["Subject"].startswith("[REKI] Quality gate 'raw_interactions' failed in reki_daily.gate_raw for dt=2026-01-05")
    assert "expect_column_values_to_not_be_null on column &#x27;user_id&#x27; (1 unexpected)" in email_body(mail)


def test_publish_deadline_alert_is_accepted_by_airflow_and_its_callback_alerts(monkeypatch, cfg, http_receiver):
    from airflow.sdk import DAG, DeadlineAlert, task

    from reki_airflow.notifiers import on_publish_deadline_missed, publish_deadline_alert

    deadline = publish_deadline_alert(cfg)  # default: daily data-interval timetable
    assert isinstance(deadline, DeadlineAlert)
    assert deadline.interval == dt.timedelta(days=1, hours=cfg.alerts.publish_deadline_hours)
    assert deadline.callback.path == "reki_airflow.notifiers.on_publish_deadline_missed"

    # Airflow takes it as a DAG deadline and serializes it (what the DAG processor stores).
    from airflow.serialization.serialized_objects import DagSerialization

    with DAG("reki_deadline_probe", schedule="@daily", start_date=dt.datetime(2026, 1, 1), catchup=False,
             deadline=deadline) as dag:
        @task
        def publish():
            return None

        publish()
    serialized = json.dumps(DagSerialization.serialize_dag(dag), default=str)
    assert "reki_airflow.notifiers.on_publish_deadline_missed" in serialized

    # The callback, called the way Airflow's executor calls it on a missed deadline.
    for key, value in connection_env(http_receiver, None).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AIRFLOW_CONN_REKI_SMTP", raising=False)
    dag_run = {"dag_id": "reki_daily", "dag_run_id": "scheduled__2026-01-05T00:00:00+00:00",
               "logical_date": "2026-01-05T00:00:00+00:00", "run_type": "scheduled", "state": "running", "conf": {}}
    context = {"dag_run": dag_run, "deadline": {"id": "d-1", "deadline_time": "2026-01-06T06:00:00+00:00"}}
    results = on_publish_deadline_missed(context=context, **deadline.callback.kwargs)
    assert results["webhook"] == "sent" and results["slack"] == "sent"
    alert = http_receiver.on("/hooks/reki")[0]["body"]
    assert alert["kind"] == "deadline_missed" and alert["dt"] == "2026-01-05"
    assert alert["deadline"] == {"deadline_time": "2026-01-06T06:00:00+00:00",
                                 "hours_after_interval_end": cfg.alerts.publish_deadline_hours}
    assert "running" in alert["error"]

    # Backfill runs are late by design: no alert.
    before = len(http_receiver.requests)
    assert on_publish_deadline_missed(context={**context, "dag_run": {**dag_run, "run_type": "backfill"}},
                                      **deadline.callback.kwargs) == {}
    time.sleep(0.2)
    assert len(http_receiver.requests) == before
