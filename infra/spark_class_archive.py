"""Training run for the JVM class archive of spark-submitted jobs (`reki setup` submits it; see
`reki_core.spark.ensure_class_archive`).

It runs every Spark job of the daily DAG, a full build and then two daily runs, on a small synthetic lake
in a temporary folder, so the JVM loads the classes the real jobs use before it writes the archive at exit.
"""

from __future__ import annotations

import os
import sys
import tempfile

from reki_core.config import load_config
from reki_core.datasets import synthetic
from reki_core.spark import get_spark
from reki_core.storage.lake import Lake
from spark_jobs import clusters, ctr_samples, items, user_history


def main() -> int:
    cfg = load_config()
    collective = load_config(environ={**os.environ, "REKI__SCENARIO_OVERRIDES": "{extraction_mode: collective}"})
    spark = get_spark(cfg, "reki-class-archive")
    with tempfile.TemporaryDirectory(prefix="reki-class-archive-") as tmp:
        lake = Lake(tmp)
        data = synthetic.generate(3_000, n_users=120, n_items=200, days=6, seed=5)
        days = synthetic.write_raw_lake(lake, data.interactions, data.users, data.items)
        for day in days[-3:]:  # the first is a full build, the others daily runs
            for job in (items, user_history, ctr_samples):
                job.run(spark, cfg, lake, day)
        clusters.run(spark, collective, lake, days[-1])
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
