"""Per-file facts for dataset validation: computed in parallel processes, cached by file identity.

A file's facts are its content sha256, size, declared width / height / mode, whether it fully
decodes with :mod:`podium.images`' rules, and whether it declares more pixels than ``max_pixels``
(then it is never decoded). :func:`collect_facts` computes them for the files the cache does not
hold, in a forkserver process pool (the caller may be a multithreaded Prefect worker: no fork) or
in-process for small jobs, and keeps them in one SQLite table keyed on the file's absolute path and
identity (size, mtime in ns, inode) plus a salt of the decoder's source, the Pillow version and
``max_pixels``. Re-validating an unchanged dataset then reads no image; a rewritten file is
checked again, alone.

Workers import this module, :mod:`podium.images`, PIL and numpy only (no torch, no pandas).
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import multiprocessing
import os
import sqlite3
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import PIL
from PIL import Image

from podium import images
from podium.errors import DataError, first_line

log = logging.getLogger("podium.validation")

FACT_COLUMNS = ("sha256", "size_bytes", "width", "height", "mode", "decodable", "too_large", "error")
Facts = tuple  # one value per FACT_COLUMNS entry
CHUNK = 256  # files per pool task: amortises the IPC, small enough to spread a few thousand files
MIN_PARALLEL = 64  # below this many files to compute, a pool costs more than it saves
SCHEMA_VERSION = 1
SCHEMA = ("CREATE TABLE IF NOT EXISTS facts (path TEXT PRIMARY KEY, salt TEXT NOT NULL, size INTEGER NOT NULL, "
          "mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha256 TEXT, size_bytes INTEGER, width INTEGER, "
          "height INTEGER, mode TEXT, decodable INTEGER NOT NULL, too_large INTEGER NOT NULL, error TEXT)")


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image of ``max_pixels`` can need: uncompressed 16-bit RGBA, plus 16 MB of
    metadata. A larger file is refused unread (it would be read whole into a worker's memory)."""
    return max_pixels * 8 + (16 << 20)


def describe(path: Path | str, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> Facts:
    """The facts of one file (read once). ``verify()`` checks the PNG chunk CRCs (bit flips); a fresh
    ``load()`` decodes every pixel (truncation), then the conversion to the model's channels is run."""
    try:
        size = os.stat(path).st_size
        if size > max_file_bytes(max_pixels):  # read whole below: never more than an image can hold
            return (None, size, None, None, None, False, True,
                    f"{size:,} bytes, more than any image of data.max_pixels ({max_pixels / 1e6:.0f} MP) needs")
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, None, None, None, None, False, False, f"unreadable: {first_line(exc)}"
    sha, size = hashlib.sha256(data).hexdigest(), len(data)
    width = height = mode = None
    try:
        with images.open_checked(io.BytesIO(data), max_pixels) as img:
            (width, height), mode = img.size, img.mode
            img.verify()
    except DataError:  # over the pixel limit: read the declared size again, decode nothing
        with Image.open(io.BytesIO(data)) as img:
            (width, height), mode = img.size, img.mode
        return sha, size, width, height, mode, False, True, f"declares {width}x{height} pixels, above {max_pixels}"
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        return sha, size, width, height, mode, False, False, f"cannot read: {first_line(exc)}"
    try:
        with images.open_checked(io.BytesIO(data), max_pixels) as img:
            img.load()
            if mode in images.CONVERTIBLE_MODES:  # other modes fail the mode expectation, not this one
                images.to_channels(img, images.decoded_channels(mode))
    except Exception as exc:  # noqa: BLE001
        return sha, size, width, height, mode, False, False, f"cannot decode: {first_line(exc)}"
    return sha, size, width, height, mode, True, False, None


def describe_chunk(root: str, rels: Sequence[str], max_pixels: int) -> list[Facts]:
    """:func:`describe` for ``root/rel`` of each of ``rels`` (one pool task)."""
    return [describe(os.path.join(root, rel), max_pixels) for rel in rels]


def facts_salt(max_pixels: int) -> str:
    """What a cached fact depends on besides the file: the decoder's and this module's code,
    the Pillow version and the pixel limit."""
    code = Path(images.__file__).read_bytes() + Path(__file__).read_bytes()
    return hashlib.sha256(code + f"\0{PIL.__version__}\0{int(max_pixels)}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the cache


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60)  # a concurrent validation's write waits, not fails
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            conn.execute("DROP TABLE IF EXISTS facts")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute(SCHEMA)
        conn.commit()
    except BaseException:
        conn.close()
        raise
    return conn


def _discard(path: Path, exc: BaseException) -> None:
    log.warning("facts cache %s is unreadable (%s): discarding and rebuilding it", path, first_line(exc))
    for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)


def open_cache(path: Path | str) -> sqlite3.Connection | None:
    """The facts cache at ``path`` (created if absent); a corrupt file is discarded with a warning
    and rebuilt. None (with a warning) when it cannot be used at all: validation then runs uncached."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return _connect(path)
        except sqlite3.OperationalError:
            raise  # locked for longer than the timeout, or not writable: keep the file
        except sqlite3.DatabaseError as exc:  # "file is not a database", "disk image is malformed"
            _discard(path, exc)
            return _connect(path)
    except (OSError, sqlite3.Error) as exc:
        log.warning("facts cache %s cannot be used (%s): computing every file's facts", path, first_line(exc))
        return None


def _cached(conn: sqlite3.Connection, root: str, salt: str) -> dict[str, tuple[tuple[int, int, int], Facts]]:
    """Every row under ``root/`` made with ``salt``: absolute path -> (identity, facts)."""
    prefix = root.rstrip("/") + "/"
    rows = conn.execute(f"SELECT path, size, mtime_ns, inode, {', '.join(FACT_COLUMNS)} FROM facts "
                        "WHERE path >= ? AND path < ? AND salt = ?", (prefix, prefix[:-1] + "0", salt))
    return {r[0]: ((r[1], r[2], r[3]), (*r[4:9], bool(r[9]), bool(r[10]), r[11])) for r in rows}


def _store(conn: sqlite3.Connection, salt: str, rows: list[tuple[str, tuple[int, int, int], Facts]]) -> None:
    with conn:
        conn.executemany(f"INSERT OR REPLACE INTO facts VALUES ({', '.join('?' * 13)})",
                         [(path, salt, *ident, *facts) for path, ident, facts in rows])


# ----------------------------------------------------------------------------- computing


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def _compute(root: str, rels: list[str], max_pixels: int, workers: int
             ) -> Iterator[tuple[list[str], list[Facts]]]:
    """(chunk, its facts) for ``rels``, in a process pool when it pays off, in completion order."""
    if workers <= 1 or len(rels) < MIN_PARALLEL:
        for start in range(0, len(rels), CHUNK):
            chunk = rels[start:start + CHUNK]
            yield chunk, describe_chunk(root, chunk, max_pixels)
        return
    size = max(1, min(CHUNK, math.ceil(len(rels) / (4 * workers))))  # every worker gets a few tasks
    chunks = [rels[start:start + size] for start in range(0, len(rels), size)]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])  # imported once by the server, not per worker
    pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context)
    try:
        futures = {pool.submit(describe_chunk, root, chunk, max_pixels): chunk for chunk in chunks}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BrokenProcessPool as exc:
        raise DataError(f"a validation worker died while checking {root} ({first_line(exc)}; out of memory?): "
                        "the facts found so far are cached; data.num_workers=0 names the file") from None
    finally:  # also when the caller stops early (an interrupt): queued chunks are dropped, not run
        pool.shutdown(wait=True, cancel_futures=True)


def collect_facts(root: Path | str, rels: Sequence[str], max_pixels: int = images.DEFAULT_MAX_PIXELS,
                  workers: int | None = None, cache: Path | str | None = None) -> tuple[list[Facts], int, int]:
    """Facts of ``root/rel`` for each of ``rels`` (in that order), and how many were computed / reused.

    ``workers``: processes (None: :func:`default_workers`; 0 or 1: in this process). ``cache``: the
    SQLite facts cache (None: none). Computed facts are stored chunk by chunk, so an interrupted run
    keeps what it finished."""
    root = os.path.abspath(root)
    workers = default_workers() if workers is None else workers
    salt = facts_salt(max_pixels)
    conn = open_cache(cache) if cache is not None else None
    found: dict[str, Facts] = {}
    identity: dict[str, tuple[int, int, int]] = {}
    try:
        cached = {}
        if conn is not None:
            try:
                cached = _cached(conn, root, salt)
            except sqlite3.DatabaseError as exc:  # corruption the header did not show
                conn.close()
                conn = None
                if isinstance(exc, sqlite3.OperationalError):
                    log.warning("facts cache %s cannot be read (%s): computing every file's facts", cache,
                                first_line(exc))
                else:
                    _discard(Path(cache), exc)
                    conn = open_cache(cache)
        todo = []
        for rel in rels:
            try:
                st = os.stat(os.path.join(root, rel))
                ident = (st.st_size, st.st_mtime_ns, st.st_ino)  # taken before the file is read
            except OSError:  # gone since it was listed: describe() reports it unreadable
                ident = (-1, -1, -1)
            identity[rel] = ident
            hit = cached.get(os.path.join(root, rel))
            if hit is not None and hit[0] == ident:
                found[rel] = hit[1]
            else:
                todo.append(rel)
        del cached
        reused = len(found)
        for chunk, facts in _compute(root, todo, max_pixels, workers):
            found.update(zip(chunk, facts))
            if conn is not None:
                try:
                    _store(conn, salt, [(os.path.join(root, r), identity[r], f) for r, f in zip(chunk, facts)])
                except sqlite3.Error as exc:
                    log.warning("facts cache %s not updated (%s)", cache, first_line(exc))
                    conn.close()
                    conn = None
    finally:
        if conn is not None:
            conn.close()
    return [found[rel] for rel in rels], len(todo), reused
