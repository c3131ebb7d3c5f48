"""REKI Pipeline core library: everything the DAGs call. Never imports Airflow."""

__version__ = "0.1.0"
