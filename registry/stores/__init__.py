"""Artifact stores for deployment releases, by URI scheme: one file per backend.

``open_store("s3://bucket/prefix")``, ``open_store("file:///abs/path")`` or a plain folder path.
Release code (:mod:`podium.registry.release`) only speaks :class:`ArtifactStore`, so it never knows
which backend it talks to. A new backend is one file: subclass ``ArtifactStore``, list it below.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from podium.errors import StoreError
from podium.registry.stores.base import ArtifactStore, check_key
from podium.registry.stores.local import LocalStore
from podium.registry.stores.s3 import S3Store

__all__ = ["ArtifactStore", "LocalStore", "S3Store", "StoreError", "check_key", "open_store"]


def _open_file(uri: str, _endpoint: str | None, **_options) -> ArtifactStore:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise StoreError(f"store URI {uri!r}: only local file:/// URIs are supported", "invalid")
    return LocalStore(unquote(parsed.path))


SCHEMES = {"s3": S3Store.from_uri, "file": _open_file}


def open_store(uri: str | Path, endpoint_url: str | None = None, **s3_options) -> ArtifactStore:
    """The store a URI names; ``s3_options`` go to :class:`S3Store` (``max_attempts``, timeouts)."""
    text = str(uri)
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme is None:
        return LocalStore(text)
    if scheme not in SCHEMES:
        raise StoreError(f"unsupported store URI {text!r} (use s3://bucket/prefix, file:///path or a folder)",
                         "invalid")
    return SCHEMES[scheme](text, endpoint_url, **s3_options)
