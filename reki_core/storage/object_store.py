"""S3 access (boto3) for SeaweedFS locally and any S3-compatible store in production.

Credentials come from the caller (an Airflow connection resolved in plugins/) or the standard
environment variables; never from files under version control.
"""

from __future__ import annotations

import os

import boto3
from botocore.config import Config as BotoConfig


def make_s3_client(endpoint_url: str | None = None, access_key: str | None = None, secret_key: str | None = None,
                   region: str = "us-east-1"):
    """A boto3 S3 client; boto3 1.36+ default checksums break some S3-compatible stores, so only when required."""
    config = BotoConfig(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 4, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
        aws_access_key_id=access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region_name=region,
        config=config,
    )
