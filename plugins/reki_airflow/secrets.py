"""Keep the pipeline's secrets out of task logs: register them with Airflow's secrets masker.

Call `register_secrets_for_masking()` at the start of every task (or once in the DAG file's task
callable); any later log line that contains one of the values shows `***` instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

# Environment variables whose values are credentials, besides the configured LLM API key variable.
SECRET_ENV_NAMES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "OPENAI_API_KEY", "HF_TOKEN",
                    "HUGGING_FACE_HUB_TOKEN", "SLACK_WEBHOOK_URL")
SECRET_ENV_PATTERN = re.compile(r"(?i)(SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|APIKEY|PRIVATE_KEY)")
# Values shorter than this are not masked: masking "1" or "true" would garble every log line.
MIN_SECRET_CHARS = 6


def collect_secrets(cfg=None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Name -> value of every secret the pipeline can see: S3 keys and the Spark Connect token on disk, credential env variables."""
    environ = dict(os.environ if environ is None else environ)
    if cfg is None:
        from reki_core.config import load_config

        cfg = load_config(environ=environ)
    found: dict[str, str] = {}
    creds_path = Path(cfg.state_dir) / "secrets" / "s3_credentials.json"
    if creds_path.is_file():
        for role, values in json.loads(creds_path.read_text()).items():
            found[f"s3 {role} secret key ({creds_path})"] = values.get("secret_key", "")
    token_path = Path(cfg.state_dir) / "secrets" / "spark_connect.json"
    if token_path.is_file():
        found[f"Spark Connect token ({token_path})"] = json.loads(token_path.read_text()).get("token", "")
    names = set(SECRET_ENV_NAMES) | {cfg.llm.engine.api_key_env}
    names |= {n for n in environ if SECRET_ENV_PATTERN.search(n) and not n.startswith("REKI__")}
    for name in sorted(names):
        if environ.get(name):
            found[f"env {name}"] = environ[name]
    return {name: value for name, value in found.items() if value and len(value) >= MIN_SECRET_CHARS}


def register_secrets_for_masking(cfg=None, environ: dict[str, str] | None = None) -> list[str]:
    """Mask every secret from `collect_secrets` in task logs; returns the names (never the values) masked."""
    from airflow.sdk.log import mask_secret  # Airflow 3.3: masks in the task process and its supervisor

    secrets = collect_secrets(cfg, environ)
    for value in secrets.values():
        # No name: Airflow masks a named value only when the name looks sensitive (SLACK_WEBHOOK_URL does not).
        mask_secret(value)
    log.info("masking %d secret(s) in task logs: %s", len(secrets), ", ".join(secrets))
    return list(secrets)
