"""The scheduler entry point that `infra/airflow.sh` starts: the task libraries are imported, then Airflow's
own `scheduler` command runs with the arguments given (the backfill suite runs whole DAGs through it)."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import sys
sys.argv = ["reki_airflow.scheduler", "--help"]
import reki_airflow.scheduler as entry
try:
    entry.main()
except SystemExit as exc:
    print("EXIT", exc.code)
print("PRELOADED", sorted(m for m in entry.PRELOADED if m in sys.modules) == sorted(entry.PRELOADED))
"""


def test_scheduler_entry_point_preloads_the_task_libraries_and_hands_its_arguments_to_airflow():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert "usage: airflow scheduler" in out.lower(), out[-2000:]
    assert "EXIT 0" in done.stdout
    assert "PRELOADED True" in done.stdout
