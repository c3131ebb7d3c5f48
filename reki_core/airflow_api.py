"""A client of Airflow 3's REST API: the calls the UI makes (the admin's token, unpausing, runs by day, backfills).

Standard library only, no Airflow import: the integration tests and the benchmarks drive a running Airflow (the
embedded stack or the cluster profile) through it, as a user's script would.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

DONE = ("success", "failed")


class AirflowApiError(RuntimeError):
    """A call Airflow refused: the method, path, status and Airflow's own reason (its `detail`)."""

    def __init__(self, method: str, path: str, code: int, detail: str):
        super().__init__(f"Airflow refused {method} {path}: HTTP {code}: {detail}")
        self.code = code


class AirflowApi:
    def __init__(self, base: str, password: str, username: str = "admin"):
        self.base = base.rstrip("/")
        req = urllib.request.Request(f"{self.base}/auth/token", method="POST",
                                     data=json.dumps({"username": username, "password": password}).encode(),
                                     headers={"Content-Type": "application/json"})
        self.token = json.load(urllib.request.urlopen(req, timeout=30))["access_token"]

    @classmethod
    def with_password_file(cls, base: str, password_file: Path, wait_s: float = 120, user: str = "admin") -> "AirflowApi":
        """Signed in as `user` with its generated password from `password_file` (`{user: password}`, 0600, written at
        set-up), waiting `wait_s` for the file."""
        deadline = time.monotonic() + wait_s
        while not password_file.is_file():
            if time.monotonic() > deadline:
                raise FileNotFoundError(f"{password_file}: no password file in {wait_s:.0f} s")
            time.sleep(1)
        return cls(base, json.loads(password_file.read_text())[user], username=user)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token}"})
        attempt = 0
        while True:
            try:
                return json.load(urllib.request.urlopen(req, timeout=60))
            except urllib.error.HTTPError as exc:
                attempt += 1
                # 503: a busy metadata DB; Airflow rolled the call back, so the call may repeat
                if exc.code != 503 or attempt == 5:
                    raise AirflowApiError(method, path, exc.code, exc.read().decode(errors="replace")[:2000]) from exc
                time.sleep(5 * attempt)

    def unpause(self, dag_id: str, wait_s: float = 300) -> bool:
        """Unpause `dag_id` once the dag-processor has parsed and serialized it (backfills run only unpaused)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.call("GET", f"/api/v2/dags/{dag_id}")
                break
            except AirflowApiError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(3)
        return self.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})["is_paused"] is False

    def runs(self, dag_id: str) -> list[dict]:
        """The DAG's runs (up to 100), as the API lists them."""
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]

    def runs_by_day(self, dag_id: str) -> dict[dt.date, dict]:
        """The DAG's runs keyed by the first day of their data interval (the day a daily run processes)."""
        return {dt.date.fromisoformat(r["data_interval_start"][:10]): r for r in self.runs(dag_id)
                if r.get("data_interval_start")}

    def wait_for_days(self, dag_id: str, days: list[dt.date], timeout_s: float,
                      interval_s: float = 10) -> dict[dt.date, dict | None]:
        """The run of each of `days` once all succeeded, one failed, or `timeout_s` passed (some unfinished then)."""
        deadline = time.monotonic() + timeout_s
        while True:
            runs = self.runs_by_day(dag_id)
            wanted = {d: runs.get(d) for d in days}
            states = [r and r["state"] for r in wanted.values()]
            if all(s == "success" for s in states) or "failed" in states or time.monotonic() > deadline:
                return wanted
            time.sleep(interval_s)

    def wait_backfills_completed(self, dag_id: str, timeout_s: float = 300) -> None:
        """The scheduler marks a backfill completed a loop after its last run: only then may the next one start."""
        deadline = time.monotonic() + timeout_s
        while True:
            backfills = self.call("GET", f"/api/v2/backfills?dag_id={dag_id}")["backfills"]
            if all(b.get("completed_at") for b in backfills):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"backfills of {dag_id} still active after {timeout_s:.0f} s: {backfills}")
            time.sleep(5)


def states_of(runs: dict[dt.date, dict | None]) -> dict[dt.date, str | None]:
    return {day: run and run["state"] for day, run in runs.items()}
