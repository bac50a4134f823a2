"""The artifact store protocol and the generic work every backend shares.

A store is flat key/value object storage over keys relative to its root (``m/d/v1/model.onnx``).
:class:`ArtifactStore` owns what does not depend on the backend: key checks, atomic downloads
(a temp file beside the destination, renamed into place only when complete) and error translation
(every backend exception becomes one :class:`~podium.errors.StoreError` line via the backend's
``_translate``). A backend implements the ``_``-prefixed primitives and ``_translate`` only.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ClassVar, Iterator, TypeVar

from podium.errors import StoreError
from podium.files import atomic_path

T = TypeVar("T")

# What each public operation is called in messages, per backend (``_verbs``).
OPERATIONS = ("put", "get", "exists", "list", "delete")


def check_key(key: str) -> str:
    """Reject keys that could escape the store root or are ambiguous (absolute, '..', empty parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid store key {key!r}", "invalid")
    return key


def check_prefix(prefix: str) -> str:
    if "\\" in prefix or prefix.startswith("/") or ".." in prefix.split("/"):
        raise StoreError(f"invalid store prefix {prefix!r}", "invalid")
    return prefix


class ArtifactStore(ABC):
    uri: str
    schemes: ClassVar[tuple[str, ...]] = ()
    verbs: ClassVar[dict[str, str]] = {op: op for op in OPERATIONS}

    # --- backend primitives ------------------------------------------------------------------
    @abstractmethod
    def _put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _create_if_absent(self, key: str, data: bytes) -> bool:
        """Write the whole object only if none exists at ``key``, atomically; False when one exists."""

    @abstractmethod
    def _get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with ``max_bytes``, at most ``max_bytes + 1`` of them."""

    @abstractmethod
    def _download(self, key: str, path: Path) -> None:
        """Write the object to ``path`` (a fresh temp file; the base renames it into place)."""

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _iter_keys(self, prefix: str) -> Iterator[str]: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _translate(self, exc: Exception, operation: str, key: str | None) -> StoreError:
        """One clear StoreError line for a backend exception."""

    @abstractmethod
    def describe(self, key: str) -> str:
        """The object's full address for messages (``s3://b/k``, ``file:///...``)."""

    # --- the generic work --------------------------------------------------------------------
    def _guard(self, operation: str, key: str | None, action: Callable[[], T]) -> T:
        try:
            return action()
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated to one line
            raise self._translate(exc, operation, key) from None

    def put_file(self, key: str, path: Path | str) -> None:
        check_key(key)
        if not Path(path).is_file():
            raise StoreError(f"cannot upload {path}: not a file", "invalid")
        self._guard("put", key, lambda: self._put_file(key, Path(path)))

    def put_bytes(self, key: str, data: bytes) -> None:
        check_key(key)
        self._guard("put", key, lambda: self._put_bytes(key, data))

    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Write ``data`` at ``key`` unless an object is there: of writers racing for a key exactly one
        gets True, and readers see the winner's whole object (the store's locks are built on this)."""
        check_key(key)
        return self._guard("put", key, lambda: self._create_if_absent(key, data))

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object at ``key``; ``max_bytes`` bounds what is read (a document the caller parses), and a
        larger object is a StoreError (``invalid``) without reading the rest."""
        check_key(key)
        data = self._guard("get", key, lambda: self._get_bytes(key, max_bytes))
        if max_bytes is not None and len(data) > max_bytes:
            raise StoreError(f"{self.describe(key)} is larger than {max_bytes:,} bytes: refused", "invalid")
        return data

    def get_file(self, key: str, dest_path: Path | str) -> None:
        """Download to ``dest_path`` atomically: a reader never sees a partial file there."""
        check_key(key)
        dest = Path(dest_path)
        try:
            with atomic_path(dest) as tmp:
                self._guard("get", key, lambda: self._download(key, tmp))
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot write {dest}: {exc.strerror or exc}") from None

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            return self._guard("exists", key, lambda: self._exists(key))
        except StoreError as exc:
            if exc.kind == "missing":
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (a string prefix, as S3), sorted; temp files are skipped."""
        check_prefix(prefix)
        return self._guard("list", None, lambda: sorted(self._iter_keys(prefix)))

    def delete(self, key: str) -> None:
        check_key(key)
        self._guard("delete", key, lambda: self._delete(key))
