"""Files written whole or not at all, and content hashes: the one copy of each, at the bottom.

Every writer in Podium that must never leave half a file (store objects, caches, exports, checkpoints,
fetched releases) goes through :func:`atomic_path`: the content is written to a temp file in the
target's own folder (same filesystem, so the rename is atomic) and renamed over the target only
once complete. A crash leaves the old file or the new one, plus at most a temp file whose name
starts with :data:`TMP_MARK` (listings skip those).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

TMP_MARK = ".podium-tmp-"
CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_path(target: Path | str, fsync: bool = False) -> Iterator[Path]:
    """A temp path beside ``target``; on a clean exit it replaces ``target``, on an error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{TMP_MARK}{target.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: Path | str, data: bytes, fsync: bool = False) -> Path:
    with atomic_path(target, fsync) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: Path | str, text: str) -> Path:
    return atomic_write_bytes(target, text.encode())


def atomic_copy(source: Path | str, target: Path | str, fsync: bool = False) -> Path:
    """Copy ``source`` to ``target`` in chunks, atomically."""
    with atomic_path(target, fsync) as tmp, open(source, "rb") as src, open(tmp, "wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
    return Path(target)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def size_and_sha256(path: Path | str) -> tuple[int, str]:
    """Byte size and sha256 of a file, read once in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def sha256_file(path: Path | str) -> str:
    return size_and_sha256(path)[1]


def files_digest(paths: Iterable[Path | str]) -> str:
    """A short digest of several files' names and contents (source code in cache keys)."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
