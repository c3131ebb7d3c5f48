"""The REST client the tests and benchmarks drive Airflow with (`reki_core.airflow_api`), against a small local
HTTP server that answers as Airflow 3's API does (the seam: the integration suites run it against real Airflow)."""

from __future__ import annotations

import datetime as dt
import json
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reki_core import airflow_api
from reki_core.airflow_api import AirflowApi, AirflowApiError, states_of


class FakeAirflow(BaseHTTPRequestHandler):
    busy_answers = 0  # how many 503s the next dagRuns calls get
    runs: list[dict] = []
    calls: list[tuple[str, str, str | None]] = []

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/auth/token":
            ok = body == {"username": "admin", "password": "pw"}
            return self._reply(201 if ok else 401, {"access_token": "tok"} if ok else {"detail": "bad"})
        return self._reply(404, {})

    def do_GET(self):
        FakeAirflow.calls.append(("GET", self.path, self.headers.get("Authorization")))
        if self.path.startswith("/api/v2/dags/d/dagRuns"):
            if FakeAirflow.busy_answers:
                FakeAirflow.busy_answers -= 1
                return self._reply(503, {"detail": "database is locked"})
            return self._reply(200, {"dag_runs": FakeAirflow.runs})
        return self._reply(404, {"detail": "not found"})


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setattr(airflow_api.time, "sleep", lambda s: None)  # the retry and poll pauses
    FakeAirflow.busy_answers, FakeAirflow.runs, FakeAirflow.calls = 0, [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAirflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield AirflowApi(f"http://127.0.0.1:{server.server_port}/", "pw")
    finally:
        server.shutdown()


def _run(day: str, state: str) -> dict:
    return {"dag_run_id": f"r{day}", "data_interval_start": f"{day}T00:00:00Z", "state": state}


def test_a_busy_database_is_retried_and_other_errors_are_not(api):
    FakeAirflow.busy_answers = 2
    FakeAirflow.runs = [_run("2024-01-01", "success")]
    assert api.runs_by_day("d") == {dt.date(2024, 1, 1): FakeAirflow.runs[0]}
    assert len(FakeAirflow.calls) == 3 and all(auth == "Bearer tok" for _, _, auth in FakeAirflow.calls)
    with pytest.raises(AirflowApiError, match="GET /api/v2/dags/missing: HTTP 404: .*not found") as err:
        api.call("GET", "/api/v2/dags/missing")
    assert err.value.code == 404 and len(FakeAirflow.calls) == 4


def test_waiting_for_days_stops_at_the_first_failed_run_and_reports_unstarted_days(api):
    FakeAirflow.runs = [_run("2024-01-01", "success"), _run("2024-01-02", "failed")]
    days = [dt.date(2024, 1, 1), dt.date(2024, 1, 2), dt.date(2024, 1, 3)]
    states = states_of(api.wait_for_days("d", days, timeout_s=60))
    assert states == {days[0]: "success", days[1]: "failed", days[2]: None}


def test_a_wrong_password_is_refused(api):
    with pytest.raises(urllib.error.HTTPError) as err:
        AirflowApi(api.base, "not-pw")
    assert err.value.code == 401


def test_a_missing_password_file_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(airflow_api.time, "sleep", lambda s: None)
    missing = tmp_path / "airflow_passwords.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        AirflowApi.with_password_file("http://127.0.0.1:1", missing, wait_s=0)
