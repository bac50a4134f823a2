"""A local folder with the S3 layout: the embedded default store."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from podium.errors import StoreError
from podium.files import TMP_MARK, atomic_copy, atomic_write_bytes
from podium.registry.stores.base import ArtifactStore


class LocalStore(ArtifactStore):
    """Every write is atomic (temp file in the same folder, fsync, rename), as a PUT is on S3."""

    schemes = ("file",)
    verbs = {"put": "write", "get": "read", "exists": "read", "list": "list", "delete": "delete"}

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def describe(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def _translate(self, exc: Exception, operation: str, key: str | None) -> StoreError:
        target = self.describe(key) if key is not None else self.uri
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) and operation == "get":
            return StoreError(f"no object {target}", "missing")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return StoreError(f"cannot {self.verbs[operation]} {target}: {reason}")

    def _put_file(self, key: str, path: Path) -> None:
        atomic_copy(path, self._path(key), fsync=True)

    def _put_bytes(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._path(key), data, fsync=True)

    def _create_if_absent(self, key: str, data: bytes) -> bool:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{TMP_MARK}{target.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(name, target)  # link(2) never replaces: one racer wins, with a complete file
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(name)

    def _get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        with open(self._path(key), "rb") as handle:
            return handle.read() if max_bytes is None else handle.read(max_bytes + 1)

    def _download(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(src)
        with open(src, "rb") as inp, open(path, "wb") as out:
            shutil.copyfileobj(inp, out, 1 << 20)

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        # walk only the deepest folder the prefix names, like S3 walks only matching keys
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return
        for dirpath, _dirs, names in os.walk(start):
            for name in names:
                if name.startswith(TMP_MARK):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
