"""The object store under a Spark job: how its failure is explained (`spark_jobs.common.store_error`: the server's
identity refused, or the store not answering the server, each named with the bucket and the endpoint; anything else
left as it was), and the file the check before the jobs asks the server for (`Lake.any_metadata_file`)."""

from __future__ import annotations

from reki_core.storage.lake import Lake, TableStore
from reki_core.storage.s3_access import ObjectStoreError, S3Access
from spark_jobs.common import store_error, store_refused

ENDPOINT = "http://127.0.0.1:8333"


def _store_lake(tmp_path) -> Lake:
    access = S3Access(ENDPOINT, "reki-published", "writer-key", "writer-secret")
    store = TableStore("reki", "sqlite:///unused.db", {}, "s3a://reki-lake/warehouse", access)
    return Lake(str(tmp_path / "lake"), store=store)


def test_a_refused_identity_names_the_bucket_the_endpoint_and_whose_identity(tmp_path):
    failure = RuntimeError("org.apache.iceberg.exceptions.RuntimeIOException: Failed to open input stream\n"
                           "java.nio.file.AccessDeniedException: s3a://reki-lake/warehouse/x.json: getFileStatus on "
                           "s3a://reki-lake/warehouse/x.json: software.amazon.awssdk.services.s3.model.S3Exception: "
                           "null (Service: S3, Status Code: 403, Request ID: 1)")
    explained = store_error(failure, _store_lake(tmp_path), "features_items")
    assert isinstance(explained, ObjectStoreError)
    message = str(explained)
    assert message.startswith("Spark job features_items: the object store at " + ENDPOINT), message
    assert "refused the Spark server's identity on s3://reki-lake" in message and "AWS_ACCESS_KEY_ID" in message
    assert "Status Code: 403" in message  # the store's own words


def test_a_store_that_does_not_answer_the_server_names_the_endpoint(tmp_path):
    failure = RuntimeError("org.apache.hadoop.fs.s3a.AWSClientIOException: getFileStatus on s3a://reki-lake/w/x.json\n"
                           "software.amazon.awssdk.core.exception.SdkClientException: Unable to execute HTTP request: "
                           "Connect to 127.0.0.1:8333 failed: Connection refused")
    message = str(store_error(failure, _store_lake(tmp_path), "features_user_history"))
    assert "features_user_history" in message and f"the object store at {ENDPOINT} did not answer" in message, message
    assert "s3://reki-lake" in message and "Connection refused" in message, message


def test_other_failures_and_folder_lakes_are_left_as_they_are(tmp_path):
    assert store_error(ValueError("UNRESOLVED_COLUMN: `title`"), _store_lake(tmp_path), "features_items") is None
    refused = RuntimeError("S3Exception: (Service: S3, Status Code: 403)")
    assert store_error(refused, Lake(str(tmp_path / "folder")), "features_items") is None


def test_only_a_refusal_is_the_stores_fault_for_landing():
    """Landing re-raises a refused read (the server's identity) instead of blaming the delivered file; a store that
    does not answer, or a file that does not parse, is no refusal."""
    assert store_refused(RuntimeError("java.nio.file.AccessDeniedException: s3a://reki-lake/x: Status Code: 403"))
    assert not store_refused(RuntimeError("SdkClientException: Unable to execute HTTP request: Connection refused"))
    assert not store_refused(RuntimeError("[CANNOT_READ_FILE_FOOTER] Could not read footer for file: s3a://b/day.parquet"))


def test_the_catalog_names_a_tables_metadata_file_without_reading_the_store(tmp_path):
    import pandas as pd

    lake = Lake(str(tmp_path / "lake"))
    assert lake.any_metadata_file() is None  # nothing written: nothing to check
    lake.write_partition(pd.DataFrame({"user_id": ["u1"], "age": [30]}), "raw/users", "2024-01-01")
    assert lake.any_metadata_file() == lake.load_table("raw/users").metadata_location
