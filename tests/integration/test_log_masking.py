"""Secrets registered by `reki_airflow.secrets` come out as *** in a task log written by Airflow's logging.

A fresh Python process configures Airflow's task logging the way the task supervisor does for a
task's log file (`airflow.sdk.log.configure_logging(json_output=True, output=<file>)`), registers the
pipeline's secrets, logs them through stdlib logging and structlog, and the test reads the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from reki_core.config import PROJECT_ROOT
from reki_core.localstack import ensure_credentials

pytestmark = pytest.mark.integration

TASK_SCRIPT = textwrap.dedent('''
    import json, logging, os, sys
    sys.path.insert(0, sys.argv[2])  # the Airflow plugins folder
    import structlog
    from airflow.sdk.log import configure_logging

    log_file = open(sys.argv[1], "wb")  # JSON task logs are written as bytes
    configure_logging(json_output=True, output=log_file)

    from reki_airflow.secrets import register_secrets_for_masking

    names = register_secrets_for_masking()
    s3_secret, api_key = os.environ["PROBE_S3_SECRET"], os.environ["OPENAI_API_KEY"]
    logging.getLogger("reki.extract").info("calling the LLM endpoint with api key %s", api_key)
    structlog.get_logger("reki.publish").info("uploading with s3 client", aws_secret_access_key=s3_secret)
    logging.getLogger("reki.publish").error("publish failed: %s", RuntimeError("signature for " + s3_secret))
    logging.getLogger("reki.extract").info("short values stay readable: %s", os.environ["PROBE_SHORT_TOKEN"])
    log_file.flush()
    print(json.dumps(names))
''')


def test_registered_secrets_are_masked_in_the_task_log(tmp_path):
    state = tmp_path / "state"
    s3 = ensure_credentials(state)  # the same generated credentials SeaweedFS enforces
    api_key = "sk-reki-masking-0123456789abcdef"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "REKI__"))},
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "REKI__PATHS__STATE_DIR": str(state),
        "OPENAI_API_KEY": api_key,
        "PROBE_S3_SECRET": s3["writer"].secret_key,
        "PROBE_SHORT_TOKEN": "abc",
    }
    log_path = tmp_path / "task.log"
    run = subprocess.run([sys.executable, "-c", TASK_SCRIPT, str(log_path), str(PROJECT_ROOT / "plugins")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]

    names = json.loads(run.stdout.strip().splitlines()[-1])
    assert f"s3 writer secret key ({state / 'secrets' / 's3_credentials.json'})" in names
    assert f"s3 reader secret key ({state / 'secrets' / 's3_credentials.json'})" in names
    assert "env OPENAI_API_KEY" in names and "env PROBE_S3_SECRET" in names
    assert "env PROBE_SHORT_TOKEN" not in names  # under 6 characters: masking would garble the logs

    text = log_path.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    by_event = {e["event"].split(" ")[0]: e for e in events}
    assert by_event["calling"]["event"] == "calling the LLM endpoint with api key ***"
    assert by_event["uploading"]["aws_secret_access_key"] == "***"
    assert by_event["publish"]["event"] == "publish failed: signature for ***"
    assert by_event["short"]["event"] == "short values stay readable: abc"
    for secret in (api_key, s3["writer"].secret_key):
        assert secret not in text
