import pytest

from reki_core.config import PROJECT_ROOT, ConfigError, load_config


def test_default_config_loads_with_scenario():
    cfg = load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={})
    assert cfg.scenario.name == "movielens"
    assert cfg.scenario.knowledge_window == "earliest"
    assert "soundtrack" in cfg.scenario.factors.user


def test_env_override_is_typed():
    cfg = load_config(PROJECT_ROOT / "conf" / "reki.yaml",
                      environ={"REKI__LLM__SHARD_SIZE": "7", "REKI__SCENARIO_OVERRIDES__KNOWLEDGE_WINDOW": "recent"})
    assert cfg.llm.shard_size == 7
    assert cfg.scenario.knowledge_window == "recent"


def test_books_scenario_loads():
    cfg = load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={"REKI__SCENARIO": "books"})
    assert cfg.scenario.domain == "book"


def test_unknown_key_names_key_and_file(tmp_path):
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "movielens.yaml").write_text((PROJECT_ROOT / "conf/scenarios/movielens.yaml").read_text())
    bad = tmp_path / "reki.yaml"
    bad.write_text("scenario: movielens\nrun_date: 1998-03-31\nllm:\n  shard_sise: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, environ={})
    assert "llm.shard_sise" in str(err.value) and str(bad) in str(err.value)


def test_missing_key_names_key_and_file(tmp_path):
    (tmp_path / "scenarios").mkdir()
    text = (PROJECT_ROOT / "conf/scenarios/movielens.yaml").read_text().replace("template_version: ml-v6\n", "")
    (tmp_path / "scenarios" / "movielens.yaml").write_text(text)
    good = tmp_path / "reki.yaml"
    good.write_text("scenario: movielens\nrun_date: 1998-03-31\n")
    with pytest.raises(ConfigError) as err:
        load_config(good, environ={})
    assert "template_version" in str(err.value) and "movielens.yaml" in str(err.value)
    assert "missing" in str(err.value)


def test_wrong_type_is_reported(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(PROJECT_ROOT / "conf" / "reki.yaml", environ={"REKI__LLM__SHARD_SIZE": "many"})
    assert "llm.shard_size" in str(err.value)
