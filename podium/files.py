"""Files written whole or not at all, content hashes, and bounded parsing of untrusted JSON and YAML:
the one copy of each, at the bottom.

Every writer in Podium that must never leave half a file (store objects, caches, exports, checkpoints,
fetched releases) goes through :func:`atomic_path`: the content is written to a temp file in the
target's own folder (same filesystem, so the rename is atomic) and renamed over the target only
once complete. A crash leaves the old file or the new one, plus at most a temp file whose name
starts with :data:`TMP_MARK` (listings skip those).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Hashable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

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


# ----------------------------------------------------------------------------- bounded parsing
# Every file Podium parses is untrusted: its size is capped before it is read, and the parsers are
# bounded in depth and in YAML aliases, so a hostile file is one ValueError (callers turn it into
# their own one-line error), never an exhausted machine or a RecursionError traceback.

MAX_YAML_BYTES = 1 << 20  # configs and inventories are a few KB
MAX_JSON_BYTES = 16 << 20  # manifests, current.json, cached reports
MAX_NESTING = 64
MAX_YAML_ALIASES = 100


def read_bytes_capped(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of ``path``; ValueError when it holds more than ``max_bytes`` or cannot be read.

    Reads at most ``max_bytes + 1`` bytes, so a huge file (or ``/dev/zero``) costs nothing."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except IsADirectoryError:
        raise ValueError("is a directory, not a file") from None
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > max_bytes:
        raise ValueError(f"is larger than {max_bytes:,} bytes: refused unread")
    return data


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"is not UTF-8 text (byte {exc.start})") from None


def _nesting(text: str) -> int:
    """An upper bound of the bracket depth of ``text`` (brackets inside strings count too)."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return 0
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json(data: bytes, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """``data`` as JSON, refused when larger than ``max_bytes`` or nested deeper than :data:`MAX_NESTING`."""
    if len(data) > max_bytes:
        raise ValueError(f"is larger than {max_bytes:,} bytes: refused unread")
    text = _text(data)
    if _nesting(text) > MAX_NESTING:  # json's own decoder is bounded only by the interpreter's stack
        raise ValueError(f"nests deeper than {MAX_NESTING} levels")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"is not valid JSON ({str(exc).splitlines()[0]})") from None


def load_json(path: Path | str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON document in ``path`` (see :func:`parse_json`); ValueError naming the problem."""
    return parse_json(read_bytes_capped(path, max_bytes), max_bytes)


class BoundedYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses repeated mapping keys, more than :data:`MAX_YAML_ALIASES`
    aliases (a "billion laughs" document expands exponentially once dumped) and nesting deeper than
    :data:`MAX_NESTING` (the composer recurses per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases")
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.YAMLError(f"nests deeper than {MAX_NESTING} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.YAMLError(f"repeated key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path | str, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """The YAML document in ``path`` through :class:`BoundedYamlLoader`, at most ``max_bytes`` long.

    FileNotFoundError passes through (callers word it); anything else is a one-line ValueError."""
    if not Path(path).exists():
        raise FileNotFoundError(path)
    text = _text(read_bytes_capped(path, max_bytes))
    try:
        return yaml.load(text, Loader=BoundedYamlLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as exc:
        raise ValueError(f"is not valid YAML ({str(exc).splitlines()[0]})") from None
