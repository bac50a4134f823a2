"""Artifact stores for deployment releases: a local folder or any S3-compatible bucket.

Both stores speak the same small protocol (`ArtifactStore`) over *keys* relative to the store's
root, so release code (`registry.release`) never knows which one it talks to. The local store is
the embedded default and mirrors the S3 layout on disk; `S3Store` uses boto3 and resolves its
endpoint the normal boto3 way (argument, else ``AWS_ENDPOINT_URL``, else AWS), so the same code
runs against AWS S3, MinIO or a moto server in tests.

Every failure surfaces as `StoreError` with one line naming the problem ("S3 bucket 'x' does not
exist", "no object s3://b/k", ...). botocore tracebacks stay inside this module, and credentials
are never put into messages or logs.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

log = logging.getLogger("podium.store")

__all__ = ["ArtifactStore", "LocalStore", "S3Store", "StoreError", "open_store"]


class StoreError(Exception):
    """A store operation failed; ``str(exc)`` is one line naming the problem.

    ``kind`` lets callers react without parsing text: ``missing`` (no such object), ``no_bucket``,
    ``unreachable``, ``server`` (a 5xx or throttling answer), ``credentials``, ``denied``,
    ``invalid`` (bad key or URI) or ``other``.
    """

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def transient(self) -> bool:
        """Worth trying again later: the endpoint was down, slow or overloaded."""
        return self.kind in ("unreachable", "server")


@runtime_checkable
class ArtifactStore(Protocol):
    """Flat key/value object storage. Keys are relative POSIX paths like ``m/d/v1/model.onnx``."""

    uri: str

    def put_file(self, key: str, path: Path | str) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, dest_path: Path | str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    """Reject keys that could escape the store root or are ambiguous (absolute, '..', empty parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid store key {key!r}", "invalid")
    return key


_TMP_MARK = ".podium-tmp-"


class LocalStore:
    """A folder with the S3 layout. Writes are atomic: a temp file in the same folder, then os.replace."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def describe(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def _atomic_write(self, key: str, write) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_TMP_MARK + target.name + ".")
            try:
                with os.fdopen(fd, "wb") as fh:
                    write(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StoreError(f"cannot write {self.describe(key)}: {exc.strerror or exc}") from None

    def put_file(self, key: str, path: Path | str) -> None:
        def write(fh) -> None:
            with open(path, "rb") as src:
                while chunk := src.read(1 << 20):
                    fh.write(chunk)

        if not Path(path).is_file():
            raise StoreError(f"cannot upload {path}: not a file", "invalid")
        self._atomic_write(key, write)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda fh: fh.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StoreError(f"no object {self.describe(key)}", "missing") from None
        except OSError as exc:
            raise StoreError(f"cannot read {self.describe(key)}: {exc.strerror or exc}") from None

    def get_file(self, key: str, dest_path: Path | str) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StoreError(f"no object {self.describe(key)}", "missing")
        dest = Path(dest_path)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TMP_MARK + dest.name + ".")
            try:
                with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                    while chunk := inp.read(1 << 20):
                        out.write(chunk)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StoreError(f"cannot copy {self.describe(key)} to {dest}: {exc.strerror or exc}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (string prefix, as S3), sorted; temp files are skipped."""
        if not self.root.is_dir():
            return []
        base = self.root
        # walk only the deepest folder the prefix names, like S3 walks only matching keys
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = base.joinpath(*folder.split("/")) if folder else base
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _dirs, names in os.walk(start):
            for name in names:
                if name.startswith(_TMP_MARK):
                    continue
                key = PurePosixPath(Path(dirpath, name).relative_to(base).as_posix()).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {self.describe(key)}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------- S3

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


class S3Store:
    """An S3 (or S3-compatible) bucket plus key prefix, via boto3.

    Retries use botocore's ``standard`` mode (exponential backoff with jitter on throttling and
    transient network errors); timeouts are short so an unreachable endpoint fails in seconds
    rather than minutes. Credentials come from the usual boto3 chain (env, profile, role).
    """

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

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint_url!r})"

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    # --- error translation -------------------------------------------------------------------
    def _error(self, exc: BaseException, what: str, key: str | None = None) -> StoreError:
        """Map a boto3/botocore exception to one clear StoreError line."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, EndpointConnectionError,
                                         NoCredentialsError, PartialCredentialsError, ReadTimeoutError)

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

    # --- protocol ----------------------------------------------------------------------------
    def put_file(self, key: str, path: Path | str) -> None:
        if not Path(path).is_file():
            raise StoreError(f"cannot upload {path}: not a file", "invalid")
        try:
            # managed transfer: single PUT below 8 MB, parallel multipart above; a PUT is atomic
            self._client.upload_file(str(path), self.bucket, self._key(key))
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated to one line
            raise self._error(exc, "upload to", key) from None
        log.debug("uploaded %s", self.describe(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "upload to", key) from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "download of", key) from None

    def get_file(self, key: str, dest_path: Path | str) -> None:
        dest = Path(dest_path)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TMP_MARK + dest.name + ".")
            os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None
        try:
            self._client.download_file(self.bucket, self._key(key), tmp)
            os.replace(tmp, dest)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "download of", key) from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:  # noqa: BLE001
            err = self._error(exc, "lookup of", key)
            if err.kind == "missing":
                return False
            raise err from None

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        if "\\" in prefix or prefix.startswith("/") or ".." in prefix.split("/"):
            raise StoreError(f"invalid store prefix {prefix!r}", "invalid")
        base = self.prefix + "/" if self.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(base):]

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the store prefix) that start with ``prefix``, sorted."""
        try:
            return sorted(self._iter_keys(prefix))
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "listing of") from None

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, "delete of", key) from None


def open_store(uri: str | Path, endpoint_url: str | None = None, **s3_options) -> ArtifactStore:
    """A store from ``s3://bucket/prefix``, ``file:///abs/path`` or a plain folder path.

    ``s3_options`` go to `S3Store` (``max_attempts``, ``connect_timeout``, ``read_timeout``).
    """
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        if not bucket:
            raise StoreError(f"store URI {text!r} names no bucket", "invalid")
        return S3Store(bucket, prefix, endpoint_url, **s3_options)
    if text.startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"store URI {text!r}: only local file:/// URIs are supported", "invalid")
        return LocalStore(unquote(parsed.path))
    if "://" in text:
        raise StoreError(f"unsupported store URI {text!r} (use s3://bucket/prefix, file:///path or a folder)",
                         "invalid")
    return LocalStore(text)
