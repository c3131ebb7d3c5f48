"""Connection arguments for Airflow's metadata database (SQLite in the embedded stack).

The scheduler, dag-processor, API server, triggerer, task runners and CLI all write to one SQLite file;
sqlite3's default 5 s busy wait turns ordinary contention on a loaded machine into "database is locked"
errors (seen with `airflow backfill create` while the scheduler ran). Airflow already enables WAL.
"""

SQLITE_CONNECT_ARGS = {"timeout": 60}  # seconds a writer waits for the lock before failing
SQLITE_CONNECT_ARGS_ASYNC = {"timeout": 60}  # a separate dict: Airflow adds sync-only keys to the one above
