"""The daily feature jobs in one spark-submit: `items`, then `user_history`, then `ctr_samples`.

Each job stays its own module (pure transforms plus `run`) and can be submitted alone; the daily DAG
submits them together because they always run in this order and a JVM with a Spark session costs
about 20 s to start on a small machine, more than each job's own work on a day's increment. Each job
records its own run-log step, so the summary, the gates and a failure message name the job.
"""

from __future__ import annotations

import sys

from spark_jobs import ctr_samples, items, user_history

JOBS = [(items.run, "features_items"), (user_history.run, "features_user_history"), (ctr_samples.run, "features_ctr_samples")]


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import run_as_jobs

    return run_as_jobs(JOBS, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
