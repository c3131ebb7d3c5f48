"""The pre-publish gate runs its suite on the checks the Spark job `vectors_checks` recorded (the rules themselves, on
bad and good vectors: tests/spark/test_vectors_checks.py) and reports the job's whole counts."""

import pytest

from reki_core.quality.gx import GateError
from reki_core.quality.vectors import gate_vectors
from reki_core.runlog import record_step
from tests.unit.test_gx_data_docs import DAY, record_vector_checks, seed_features, seed_vectors


def test_the_gate_reports_the_recorded_counts_and_judges_the_fallback_share_on_the_whole(cfg, lake):
    seed_features(lake)
    seed_vectors(lake, dim=cfg.model.expert_output_dim)
    checks = record_vector_checks(lake, cfg, dim=cfg.model.expert_output_dim)
    summary = gate_vectors(cfg, DAY, lake)
    assert summary["success"] and summary["rows"] == 4
    # 2 of 100 entities without a vector: within llm.max_failure_rate, though the recorded rows are all such.
    missing = [{"key": f"user:x{i}", "has_vector": False, "expected": True, "lost_vector": None, "dim": None,
                "finite": None, "model_version": None} for i in range(2)]
    record_step(lake, DAY, "vectors_checks", {"success": True, "checks": {
        **checks, "rows": 100, "failed": {"has_vector": 2}, "examples": missing}})
    assert gate_vectors(cfg, DAY, lake)["success"]
    record_step(lake, DAY, "vectors_checks", {"success": True, "checks": {
        **checks, "rows": 100, "failed": {"has_vector": 9, "finite": 77}, "model_versions": 3,
        "examples": missing + [{"key": "item:i2", "has_vector": True, "expected": True, "lost_vector": None,
                                "dim": cfg.model.expert_output_dim, "finite": False, "model_version": "m1"}]}})
    with pytest.raises(GateError) as err:
        gate_vectors(cfg, DAY, lake)
    lines = {line.split("column ")[1].split()[0]: line for line in str(err.value).splitlines() if "column '" in line}
    assert "9 unexpected" in lines["'has_vector'"] and "77 unexpected" in lines["'finite'"]
    assert "observed 3" in lines["'model_version'"]
    assert f"vectors/augmented/dt={DAY} (100 rows)" in str(err.value)
