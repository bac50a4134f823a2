"""Any S3-compatible bucket (AWS S3, MinIO, a moto server in tests) via boto3.

The endpoint resolves the normal boto3 way (argument, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, else AWS). Credentials come from the usual chain and never appear in messages.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from podium.errors import StoreError
from podium.registry.stores.base import ArtifactStore

_CRED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
               "TokenRefreshRequired", "InvalidClientTokenId", "UnrecognizedClientException"}
_SERVER_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling"}
_CODE_IN_TEXT = re.compile(r"An error occurred \((\w+)\)")


def _scrub(text: str) -> str:
    """Remove any credential value that might have slipped into a server message."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(text.split())[:300]


class S3Store(ArtifactStore):
    """A bucket plus key prefix. Retries use botocore's ``standard`` mode (backoff with jitter on
    throttling and transient network errors); timeouts are short so an unreachable endpoint fails
    in seconds rather than minutes."""

    schemes = ("s3",)
    verbs = {"put": "upload to", "get": "download of", "exists": "lookup of", "list": "listing of",
             "delete": "delete of"}

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, *,
                 max_attempts: int = 3, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 region_name: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        if len(bucket) < 3 or "/" in bucket:
            raise StoreError(f"invalid S3 bucket name {bucket!r}", "invalid")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(retries={"mode": "standard", "max_attempts": max_attempts},
                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                        # custom endpoints (MinIO, moto, IPs) rarely resolve virtual-hosted bucket names
                        s3={"addressing_style": "path"} if endpoint else None)
        # one session per store: boto3 sessions are not thread-safe, clients are
        session = boto3.session.Session(region_name=region_name)  # None: env / profile / global endpoint
        self._client = session.client("s3", endpoint_url=endpoint, config=config)
        self.endpoint_url = self._client.meta.endpoint_url
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @classmethod
    def from_uri(cls, uri: str, endpoint_url: str | None = None, **options) -> "S3Store":
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"store URI {uri!r} names no bucket", "invalid")
        return cls(bucket, prefix, endpoint_url, **options)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint_url!r})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    # --- primitives --------------------------------------------------------------------------
    def _put_file(self, key: str, path: Path) -> None:
        # managed transfer: single PUT below 8 MB, parallel multipart above; a PUT is atomic
        self._client.upload_file(str(path), self.bucket, self._key(key))

    def _put_bytes(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _create_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:  # a conditional write: S3 (since 2024), MinIO and moto refuse it when the key exists
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            # 409: another conditional write to the key is in flight; it will be the winner
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def _get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        ranged = {} if max_bytes is None else {"Range": f"bytes=0-{max_bytes}"}  # at most max_bytes + 1
        return self._client.get_object(Bucket=self.bucket, Key=self._key(key), **ranged)["Body"].read()

    def _download(self, key: str, path: Path) -> None:
        self._client.download_file(self.bucket, self._key(key), str(path))

    def _exists(self, key: str) -> bool:
        self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        return True

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        base = self.prefix + "/" if self.prefix else ""
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(base):]

    def _delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    # --- error translation -------------------------------------------------------------------
    def _translate(self, exc: Exception, operation: str, key: str | None) -> StoreError:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        what = self.verbs[operation]
        target = self.describe(key) if key is not None else f"s3://{self.bucket}"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"no S3 credentials found for bucket '{self.bucket}' (set AWS_ACCESS_KEY_ID/"
                              f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE)", "credentials")
        if isinstance(exc, (EndpointConnectionError, ConnectionError)):
            return StoreError(f"S3 endpoint {self.endpoint_url} is unreachable", "unreachable")
        if isinstance(exc, ReadTimeoutError):
            return StoreError(f"S3 endpoint {self.endpoint_url} did not answer in time ({what} {target})",
                              "unreachable")
        code, message = "", ""
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code, message = str(err.get("Code", "")), str(err.get("Message", ""))
        elif isinstance(exc, S3UploadFailedError):  # boto3's transfer wraps the ClientError as text
            found = _CODE_IN_TEXT.search(str(exc))
            code = found.group(1) if found else ""
            message = str(exc).rsplit(":", 1)[-1]
        elif isinstance(exc, BotoCoreError):
            return StoreError(f"S3 {what} {target} failed: {_scrub(str(exc))}")
        else:
            return StoreError(f"S3 {what} {target} failed: {type(exc).__name__}: {_scrub(str(exc))}")
        if code == "NoSuchBucket":
            return StoreError(f"S3 bucket '{self.bucket}' does not exist", "no_bucket")
        if code in ("NoSuchKey", "404", "NotFound"):
            if key is not None and not self._bucket_exists():
                return StoreError(f"S3 bucket '{self.bucket}' does not exist", "no_bucket")
            return StoreError(f"no object {target}", "missing")
        if code in _CRED_CODES:
            return StoreError(f"S3 credentials rejected for bucket '{self.bucket}' ({code})", "credentials")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return StoreError(f"S3 access denied to {target} (credentials rejected or lacking permission)", "denied")
        if code in _SERVER_CODES or code.startswith("5"):
            return StoreError(f"S3 {what} {target} failed: the endpoint answered {code}", "server")
        return StoreError(f"S3 {what} {target} failed: {code or 'error'}: {_scrub(message)}")

    def _bucket_exists(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return True
        except Exception as exc:  # noqa: BLE001 - only used to pick the clearer message
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError):
                return exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound")
            return True
