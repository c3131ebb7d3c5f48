"""`airflow scheduler` with the tasks' heavy libraries imported first, as gunicorn's `--preload` does.

The LocalExecutor forks its workers from the scheduler and each task from a worker (a bare `os.fork` on
Linux), so a task starts with whatever the scheduler had imported. Without this, every quality gate imports
Great Expectations again (about 5 s here, five gates a day) and the extraction and encoding tasks import
torch again. Only imports: nothing here starts a thread or opens a file before the fork.

    python -m reki_airflow.scheduler [scheduler options]    (what `infra/airflow.sh start` runs)
"""

from __future__ import annotations

import importlib
import sys

# What the daily DAG's tasks import: the gates (Great Expectations), extraction and encoding (torch, transformers),
# and every task that reads the lake (pyiceberg's SQL catalog: half a second of each task's CPU otherwise).
PRELOADED = ("pandas", "pyarrow.parquet", "great_expectations", "torch", "transformers", "pyiceberg.catalog.sql")


def main() -> None:
    for name in PRELOADED:
        importlib.import_module(name)
    from airflow.__main__ import main as airflow_main

    sys.argv = ["airflow", "scheduler", *sys.argv[1:]]
    airflow_main()


if __name__ == "__main__":
    main()
