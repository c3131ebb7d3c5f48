"""Fixtures shared by the integration suites."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_config
from tests.integration.pipeline_driver import FAST_SETTINGS


@pytest.fixture(scope="module")
def spark():
    """An in-process Spark session for a suite that drives the stages without Airflow (stopped after the
    module, so the Spark tests start theirs with their own settings)."""
    from reki_core.spark import get_spark

    cfg = make_config(Path("/nonexistent"), **FAST_SETTINGS)
    session = get_spark(cfg, "reki-integration", master="local[1]", java_options=cfg.spark.driver_java_options)
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
