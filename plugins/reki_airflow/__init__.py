"""Airflow glue for the REKI pipeline (this folder is Airflow's plugins folder): notifiers, log masking."""
