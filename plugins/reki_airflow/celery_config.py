"""Celery settings of the cluster profile (`[celery] celery_config_options`): Airflow's defaults, except that a task
published while the broker is down waits for it. Celery's default publish retry gives up within a second and Airflow
then fails the try at once (a Redis restart failed every task queued meanwhile, retries included); retrying here
instead runs into `[celery] operation_timeout`, which Airflow retries up to `task_publish_max_retries` times, one
scheduler loop apart (reki_core/cluster.py sets both)."""

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

CELERY_CONFIG = {
    **DEFAULT_CELERY_CONFIG,
    "task_publish_retry_policy": {"max_retries": 1000, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
}
