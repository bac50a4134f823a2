"""A lease lock kept in the artifact store, so every promoter of a model shares it: runs with other
cache folders, workers on other hosts, `podium rollback` and `podium models`.

The lock is one object, ``{model}/_locks/promote.json`` (no device can be named ``_locks``), taken with
the store's atomic create-if-absent (``link(2)`` on a folder, a conditional ``PUT If-None-Match: *``
on S3). It names its owner (host, pid, a random token) and carries a lease that a heartbeat thread
renews while the body runs. A lock is stale, and is broken, when its lease ran out (the holder died or
hung), or at once when its holder is a dead process on this host. Breaking goes through a marker
keyed by the stale lock's token, so of several waiters only one breaks it; the lock is released in
``finally``. The one remaining race needs a holder that stalled past its whole lease and wakes while
another took over; a lease many times the heartbeat interval makes that a hung process, not a slow one.

(It replaces an ``flock`` under the cache folder, which serialized only runs sharing that folder on
one machine. A Prefect global concurrency limit is no alternative: it is a silent no-op until the
limit is created, and with the ephemeral API a slot taken by a killed run stayed taken.)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Iterator

from podium.errors import RegistryError, StoreError
from podium.registry.release import check_name
from podium.registry.stores import ArtifactStore

log = logging.getLogger("podium.lock")

LEASE_S = 300.0  # renewed every LEASE_S / 5 while held
WAIT_S = 1800.0  # how long a run waits for another's promotion before failing


class LockHeld(RegistryError):
    """Another promoter holds the lock (raised once the wait is over)."""


def lock_key(model: str) -> str:
    return f"{check_name(model, 'model name')}/_locks/promote.json"


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class StoreLock:
    """The promotion lock of ``model`` in ``store``; use :func:`promotion_lock`."""

    def __init__(self, store: ArtifactStore, model: str, lease_s: float = LEASE_S) -> None:
        self.store, self.model, self.lease_s = store, model, lease_s
        self.key = lock_key(model)
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.lost: str | None = None  # why the lease was lost while held, if it was
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": f"{self.host}:{self.pid}", "host": self.host, "pid": self.pid,
                           "token": self.token, "purpose": f"promotion of {self.model}", "acquired_at": _when(now),
                           "expires_at": now + self.lease_s}).encode()

    def holder(self) -> dict | None:
        """The lock's current record (``{}`` when unreadable), or None when it is free."""
        try:
            data = self.store.get_bytes(self.key, 10_000)
        except StoreError as exc:
            if exc.kind == "missing":
                return None
            if exc.kind == "invalid":  # far too large to be a lock record
                return {}
            raise
        try:
            record = json.loads(data[:10_000])
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def describe(self, record: dict | None) -> str:
        if not record:
            return f"an unreadable lock {self.store.describe(self.key)}"
        expires = record.get("expires_at")
        until = _when(expires) if isinstance(expires, (int, float)) else "?"
        return f"{record.get('owner', '?')} since {record.get('acquired_at', '?')} (lease until {until})"

    def _stale_reason(self, record: dict) -> str | None:
        expires, pid = record.get("expires_at"), record.get("pid")
        if not isinstance(expires, (int, float)) or not isinstance(record.get("token"), str):
            return "its record is unreadable"
        if record.get("host") == self.host and isinstance(pid, int) and not _process_alive(pid):
            return f"process {pid} on this host is gone"
        if expires < time.time():
            return f"its lease ran out at {_when(expires)}"
        return None

    def try_acquire(self) -> dict | None:
        """Take the lock if it is free or stale: None on success, else the live holder's record."""
        for _ in range(3):
            if self.store.create_if_absent(self.key, self._record()):
                self._start_heartbeat()
                return None
            record = self.holder()
            if record is None:
                continue  # released in between: try again
            reason = self._stale_reason(record)
            if reason is None:
                return record
            self._break(record, reason)
        return self.holder() or {}

    def _break(self, record: dict, reason: str) -> None:
        stale_token = str(record.get("token", "unreadable"))
        marker = f"{self.key}.break-{hashlib.sha256(stale_token.encode()).hexdigest()[:32]}"
        if not self.store.create_if_absent(marker, self.token.encode()):
            return  # another waiter is breaking this lock
        try:
            if (self.holder() or {}).get("token", "unreadable") == record.get("token", "unreadable"):
                log.warning("breaking the promotion lock of %s held by %s: %s", self.model,
                            self.describe(record), reason)
                self.store.delete(self.key)
        finally:
            self.store.delete(marker)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_until_stopped, daemon=True,
                                           name=f"podium-lock-{self.model}")
        self._heartbeat.start()

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.lease_s / 5):
            try:
                if (self.holder() or {}).get("token") != self.token:
                    self.lost = "another promoter took it over after its lease ran out"
                    log.error("promotion lock of %s lost: %s", self.model, self.lost)
                    return
                self.store.put_bytes(self.key, self._record())
            except StoreError as exc:  # a transient outage: the lease still has 4/5 of its time
                log.warning("promotion lock of %s not renewed: %s", self.model, exc)

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=30)
        try:
            if (self.holder() or {}).get("token") == self.token:
                self.store.delete(self.key)
        except StoreError as exc:  # never mask the body's own error: the lease runs out by itself
            log.warning("promotion lock of %s not released (its lease of %.0f s will expire): %s",
                        self.model, self.lease_s, exc)


@contextlib.contextmanager
def promotion_lock(store: ArtifactStore, model: str, wait_s: float = WAIT_S, lease_s: float = LEASE_S
                   ) -> Iterator[StoreLock]:
    """Hold ``model``'s promotion lock in ``store`` while the body runs; waits up to ``wait_s`` for
    another holder (0: fail at once), then raises RegistryError naming the holder."""
    lock = StoreLock(store, model, lease_s)
    start, delay, announced = time.monotonic(), 0.1, False
    while (holder := lock.try_acquire()) is not None:
        waited = time.monotonic() - start
        if waited >= wait_s:
            raise LockHeld(f"promotion lock of {model} in {store.uri} is held by {lock.describe(holder)}; "
                           f"gave up after {waited:.0f} s")
        if not announced:
            log.info("waiting for the promotion lock of %s held by %s", model, lock.describe(holder))
            announced = True
        time.sleep(min(delay, max(wait_s - waited, 0.01)))
        delay = min(delay * 2, 2.0)
    if announced:
        log.info("promotion lock of %s taken after %.1f s", model, time.monotonic() - start)
    try:
        yield lock
    finally:
        lock.release()
    if lock.lost:
        raise RegistryError(f"promotion lock of {model} in {store.uri} was lost while held: {lock.lost}")
