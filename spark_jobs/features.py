"""The daily feature jobs in order on one session: `items`, then `user_history`, then `ctr_samples`.

Each job stays its own module (pure transforms plus `run` and a thin main) and can run alone; the DAG's
`spark_features` task runs these three on one Connect session, as this main does on one classic session.
"""

from __future__ import annotations

import sys

FEATURE_JOBS = ("items", "user_history", "ctr_samples")


def main(argv: list[str] | None = None) -> int:
    from spark_jobs.common import jobs_named, run_as_jobs

    return run_as_jobs(jobs_named(FEATURE_JOBS), argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
