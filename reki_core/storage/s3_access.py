"""Who talks to the object store, where, and what an S3 error means in words.

Credentials come from the caller (the DAG resolves the Airflow connection `aws_default`, endpoint in
its extra) or the standard environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_ENDPOINT_URL); never from files under version control. Every S3 failure is re-raised as an
`ObjectStoreError` naming the identity, the endpoint, the bucket/key and what the error code means.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError, EndpointConnectionError

from reki_core.storage.object_store import make_s3_client

# What each S3 error code means for an operator, and what to check.
_EXPLANATIONS = {
    "InvalidAccessKeyId": "the access key id is unknown to this store (wrong key, or credentials of another store/environment)",
    "SignatureDoesNotMatch": "the access key id exists but the secret key does not match it (wrong or rotated secret)",
    "AccessDenied": "the identity is authenticated but not allowed this operation (e.g. a read-only identity writing or deleting)",
    "403": "the store refused the request (wrong key, wrong secret, or missing permission; HEAD responses carry no detail)",
    "NoSuchBucket": "the bucket does not exist on this endpoint (check object_store.bucket and the endpoint)",
    "NoSuchKey": "the object does not exist",
    "404": "the object does not exist",
    "PreconditionFailed": "a conditional write lost a race (the object changed since it was read)",
}


class ObjectStoreError(RuntimeError):
    """An object-store operation failed; the message says who, where, what, and why."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class S3Access:
    """One identity on one endpoint and bucket."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def __repr__(self) -> str:  # never print the secret
        return f"S3Access(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, access_key={self.access_key!r})"

    def client(self):
        return make_s3_client(self.endpoint_url, self.access_key, self.secret_key, region=self.region)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"


def resolve_s3_access(cfg, *, endpoint_url: str | None = None, access_key: str | None = None,
                      secret_key: str | None = None, bucket: str | None = None) -> S3Access:
    """Arguments first, then AWS_* environment variables; the endpoint falls back to the config."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or cfg.object_store.endpoint_url
    key = access_key or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        missing = [n for n, v in (("access key", key), ("secret key", secret)) if not v]
        raise ObjectStoreError(
            f"no S3 {' and '.join(missing)} for {endpoint}: pass them (the DAG resolves the Airflow connection "
            "'aws_default') or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    return S3Access(endpoint, bucket or cfg.object_store.bucket, key, secret, cfg.object_store.region)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def explain(exc: Exception, access: S3Access, operation: str, key: str = "") -> ObjectStoreError:
    """An `ObjectStoreError` that names the identity, endpoint, object and the meaning of the error."""
    where = f"s3://{access.bucket}/{key}" if key else f"s3://{access.bucket}"
    who = f"identity '{access.access_key}' at {access.endpoint_url}"
    if isinstance(exc, EndpointConnectionError):
        return ObjectStoreError(f"{operation} {where} failed: cannot connect to {access.endpoint_url} "
                                f"(is the object store running? check object_store.endpoint_url / AWS_ENDPOINT_URL)")
    if not isinstance(exc, ClientError):
        return ObjectStoreError(f"{operation} {where} as {who} failed: {exc}")
    code = error_code(exc)
    meaning = _EXPLANATIONS.get(code, exc.response.get("Error", {}).get("Message", "unexpected error"))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return ObjectStoreError(f"{operation} {where} as {who} failed with {code} (HTTP {status}): {meaning}", code)


class ObjectStore:
    """Thin wrapper over one boto3 client whose errors are explained (one way to read and write)."""

    def __init__(self, access: S3Access):
        self.access = access
        self.client = access.client()

    def _call(self, operation: str, key: str, fn, **kwargs):
        try:
            return fn(Bucket=self.access.bucket, **kwargs)
        except (ClientError, EndpointConnectionError) as exc:
            raise explain(exc, self.access, operation, key) from exc

    def check_readable(self, prefix: str) -> None:
        """Fail early with a clear message when this identity cannot list the bucket."""
        self._call("list", prefix, self.client.list_objects_v2, Prefix=prefix, MaxKeys=1)

    def put(self, key: str, body, **conditions) -> dict[str, Any]:
        return self._call("write", key, self.client.put_object, Key=key, Body=body, **conditions)

    def get(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and ETag."""
        response = self._call("read", key, self.client.get_object, Key=key)
        return response["Body"].read(), response["ETag"]

    def get_json(self, key: str, missing_ok: bool = False) -> tuple[Any, str | None]:
        try:
            body, etag = self.get(key)
        except ObjectStoreError as exc:
            if missing_ok and exc.code in ("NoSuchKey", "404"):
                return None, None
            raise
        try:
            return json.loads(body), etag
        except json.JSONDecodeError as exc:
            raise ObjectStoreError(f"{self.access.uri(key)} is not valid JSON: {exc}") from exc

    def list(self, prefix: str) -> list[dict[str, Any]]:
        """Every object under a prefix (Key, Size, LastModified)."""
        objects, token = [], None
        while True:
            kwargs = {"Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self._call("list", prefix, self.client.list_objects_v2, **kwargs)
            objects.extend(page.get("Contents", []))
            if not page.get("IsTruncated"):
                return objects
            token = page["NextContinuationToken"]

    def delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            response = self._call("delete", keys[start], self.client.delete_objects,
                                  Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise ObjectStoreError(
                    f"delete under s3://{self.access.bucket}/ as identity '{self.access.access_key}' at "
                    f"{self.access.endpoint_url} failed for {len(response['Errors'])} objects, e.g. {first.get('Key')}: "
                    f"{first.get('Code')} ({_EXPLANATIONS.get(first.get('Code', ''), first.get('Message'))})",
                    first.get("Code"),
                )
