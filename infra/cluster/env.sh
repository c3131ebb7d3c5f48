# Source after infra/env.sh: Airflow's CLI (and anything else) then talks to the cluster profile (`make cluster`):
# its Airflow home, PostgreSQL, the Celery broker, the Spark master and Connect server.
#   source infra/env.sh && source infra/cluster/env.sh && airflow backfill create --dag-id reki_daily_refresh ...
eval "$(python -m reki_core.cluster env)"
