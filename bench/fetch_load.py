"""Load test of the release protocol: concurrent verified fetches into shared destinations, readers
of the installed files, and several version switches, on a local folder store and on S3.

For each store (a folder, and a moto S3 server on 127.0.0.1: nothing leaves the machine) it
publishes release v1 (a few files of up to a few MB), then runs at once:

* ``--clients`` fetch clients sharing ``--dests`` destination folders, each fetching the current
  release again and again (so several fetches replace the same folder concurrently);
* ``--readers`` threads reading whole releases out of those folders while fetches swap them, the way
  a deployment reads them: through one handle on the folder (see `fetch_release`);
* a publisher making ``--switches`` new versions current, one after another.

Every file's first line names the version it was made for, so a mixed release (v1 model + v2
weights) is caught. Counted: fetch failures, mixed and corrupt releases (a file not matching its
manifest, a marker naming another version), version regressions per client, staging folders left
behind. A read whose release was replaced and deleted under it is counted as ``gone`` (the reader
opens the folder again): that is not a mixed read. Goal: 0 failures, 0 mixed, 0 corrupt.

    python bench/fetch_load.py [--clients 16] [--dests 4] [--readers 4] [--switches 3] [--file-mb 1]
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import random
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from podium.registry.release import FETCH_MARKER, ReleaseError, fetch_release, publish_release, read_current
from podium.registry.stores import ArtifactStore, LocalStore, S3Store, StoreError

MODEL, DEVICE, BUCKET = "bench-model", "cpu-1t", "podium-bench"
SHAPE = {"model.onnx": 5.0, "weights.safetensors": 3.0, "calibration.bin": 1.0, "labels.txt": 0.0}  # MB at scale 1


class MixedRelease(AssertionError):
    """Files of two versions, or a file that does not match its manifest, in one read."""


def make_release(folder: Path, version: str, file_mb: float) -> dict[str, Path]:
    """Files whose first line names their version, then seeded random bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(version)
    files = {}
    for name, mb in SHAPE.items():
        header = f"podium-bench version={version} file={name}\n".encode()
        path = folder / name
        path.write_bytes(header + rng.randbytes(max(int(mb * file_mb * 2**20) - len(header), 0)))
        files[name] = path
    return files


def read_installed(dest: Path) -> str:
    """Read a whole installed release through one folder handle; returns its version.

    Raises MixedRelease on anything inconsistent, FileNotFoundError when the release was replaced
    and removed while being read."""
    folder = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        def read(name: str) -> bytes:
            fd = os.open(name, os.O_RDONLY, dir_fd=folder)
            with os.fdopen(fd, "rb") as fh:
                return fh.read()

        marker = json.loads(read(FETCH_MARKER))
        manifest = json.loads(read("manifest.json"))
        version = manifest["version"]
        if marker["version"] != version or sorted(marker["files"]) != sorted([*SHAPE, "manifest.json"]):
            raise MixedRelease(f"marker says v{marker['version']} {marker['files']}, manifest v{version}")
        for entry in manifest["files"]:
            data = read(entry["name"])
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise MixedRelease(f"{entry['name']} does not match the v{version} manifest")
            head = data.split(b"\n", 1)[0].decode()
            if head != f"podium-bench version={version} file={entry['name']}":
                raise MixedRelease(f"manifest v{version} but {entry['name']} says {head!r}")
        return version
    finally:
        os.close(folder)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    fetches: list[tuple[int, str | None, str | None, float]] = field(default_factory=list)  # client, version, error, s
    reads: Counter = field(default_factory=Counter)  # ok / gone / mixed / empty
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def run_store(label: str, open_client, root: Path, args: argparse.Namespace) -> dict:
    """One load phase against one store; returns a row of the table."""
    publisher = open_client()
    last = str(1 + args.switches)
    sources = {str(v): make_release(root / f"src-v{v}", str(v), args.file_mb) for v in range(1, 2 + args.switches)}
    publish_release(publisher, MODEL, DEVICE, 1, sources["1"], {"metrics": {"val_acc": 0.9}})
    deploy = root / "deploy"
    dests = [deploy / f"shared-{i}" for i in range(args.dests)]
    tally, publishing_done, everyone_done = Tally(), threading.Event(), threading.Event()
    deadline = time.monotonic() + args.max_seconds
    gate = threading.Barrier(args.clients + args.readers + 1)

    def client(idx: int) -> None:
        store, dest = open_client(), dests[idx % len(dests)]
        gate.wait()
        done, crossed = 0, False
        # at least --min-fetches, and one fetch that began after the last switch, within the deadline
        while time.monotonic() < deadline and (done < args.min_fetches or not crossed):
            crossed = publishing_done.is_set()
            start, version, error = time.perf_counter(), None, None
            try:
                version = fetch_release(store, MODEL, DEVICE, dest)["version"]
                read_installed(dest)  # whatever is there now (another client may have swapped it): whole
            except FileNotFoundError:
                pass  # swapped and removed under this check: the readers count those
            except MixedRelease as exc:
                tally.problem(f"mixed after fetch: {exc}")
            except (ReleaseError, StoreError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - anything else is a failure too, not a dead thread
                error = f"unexpected {type(exc).__name__}: {exc}"
            with tally.lock:
                tally.fetches.append((idx, version, error, time.perf_counter() - start))
            done += 1

    def reader(idx: int) -> None:
        rng = random.Random(idx)
        gate.wait()
        while not everyone_done.is_set():
            dest = rng.choice(dests)
            try:
                read_installed(dest)
                outcome = "ok"
            except FileNotFoundError:
                outcome = "gone" if dest.exists() else "empty"  # replaced under it / not fetched yet
            except MixedRelease as exc:
                outcome = "mixed"
                tally.problem(f"mixed read: {exc}")
            except (OSError, ValueError, KeyError) as exc:
                outcome = "corrupt"
                tally.problem(f"corrupt read: {type(exc).__name__}: {exc}")
            with tally.lock:
                tally.reads[outcome] += 1

    def publish_all() -> None:
        gate.wait()
        try:
            for version in range(2, 2 + args.switches):
                time.sleep(args.switch_every)
                publish_release(publisher, MODEL, DEVICE, version, sources[str(version)], {"metrics": {"val_acc": 0.9}})
        finally:
            publishing_done.set()

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    readers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(args.readers)]
    pub = threading.Thread(target=publish_all, daemon=True)
    start = time.perf_counter()
    for thread in [*clients, *readers, pub]:
        thread.start()
    for thread in [pub, *clients]:
        thread.join(timeout=max(deadline - time.monotonic(), 0) + 60)
    everyone_done.set()
    for thread in readers:
        thread.join(timeout=30)
    wall = time.perf_counter() - start

    failures = [f for f in tally.fetches if f[2] is not None]
    seen = Counter(f[1] for f in tally.fetches if f[1] is not None)
    regressions = 0
    for idx in range(args.clients):
        versions = [int(f[1]) for f in tally.fetches if f[0] == idx and f[1] is not None]
        regressions += sum(1 for a, b in itertools.pairwise(versions) if b < a)
    leftovers = sorted(p.name for p in deploy.iterdir() if p.name.startswith("."))
    latencies = sorted(f[3] for f in tally.fetches if f[2] is None)
    final = read_current(publisher, MODEL, DEVICE)
    mixed = sum(1 for p in tally.problems if p.startswith("mixed"))
    corrupt = sum(1 for p in tally.problems if p.startswith("corrupt"))
    ok = (not failures and not mixed and not corrupt and not regressions and not leftovers and last in seen
          and final is not None and final["version"] == last)
    for text in [*(f[2] for f in failures[:3]), *tally.problems[:3], *(f"left behind: {n}" for n in leftovers[:3])]:
        print(f"  {label}: {text}")
    return {"store": label, "fetches": len(tally.fetches), "failures": len(failures), "reads": tally.reads["ok"],
            "gone": tally.reads["gone"], "mixed": mixed, "corrupt": corrupt, "regressions": regressions,
            "leftovers": len(leftovers), "seen": ", ".join(f"v{v}:{n}" for v, n in sorted(seen.items(), key=lambda kv: int(kv[0]))),
            "p50": latencies[len(latencies) // 2] if latencies else float("nan"), "wall": wall,
            "final": final["version"] if final else "?", "ok": ok}


def start_moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):  # start() returns before the server answers
        try:
            urllib.request.urlopen(url, timeout=0.5)
            break
        except OSError:
            time.sleep(0.05)
    return server, url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="fetch clients")
    parser.add_argument("--dests", type=int, default=4, help="destination folders the clients share")
    parser.add_argument("--readers", type=int, default=4, help="threads reading installed releases")
    parser.add_argument("--switches", type=int, default=3, help="new versions made current during the phase")
    parser.add_argument("--switch-every", type=float, default=0.5, help="seconds between switches")
    parser.add_argument("--file-mb", type=float, default=1.0, help="release size scale (1: 9 MB per release)")
    parser.add_argument("--min-fetches", type=int, default=2, help="fetches per client at least")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="hard bound on each store's phase")
    parser.add_argument("--stores", default="local,s3", help="comma-separated: local, s3")
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    for var, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[var] = value
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_PROFILE", None)

    rows, server = [], None
    try:
        with tempfile.TemporaryDirectory(prefix="podium-fetch-load-") as tmp:
            for label in args.stores.split(","):
                root = Path(tmp) / label
                if label == "local":
                    def open_client(root=root) -> ArtifactStore:
                        return LocalStore(root / "store")
                elif label == "s3":
                    import boto3

                    server, url = start_moto()
                    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)

                    def open_client(url=url) -> ArtifactStore:  # each client has its own connection pool
                        return S3Store(BUCKET, "releases", url)
                else:
                    parser.error(f"unknown store {label!r}")
                rows.append(run_store(label, open_client, root, args))
    finally:
        if server is not None:
            server.stop()

    mb = sum(SHAPE.values()) * args.file_mb
    print(f"\nfetch_load: {args.clients} clients sharing {args.dests} destinations, {args.readers} readers, "
          f"{args.switches} version switches, {mb:.1f} MB/release")
    print(f"{'store':<6} {'fetches':>7} {'failures':>8} {'reads':>6} {'gone':>5} {'mixed':>5} {'corrupt':>7} "
          f"{'regress':>7} {'leftover':>8} {'p50 s':>6} {'wall s':>6} {'final':>5}  versions fetched")
    for r in rows:
        print(f"{r['store']:<6} {r['fetches']:>7} {r['failures']:>8} {r['reads']:>6} {r['gone']:>5} {r['mixed']:>5} "
              f"{r['corrupt']:>7} {r['regressions']:>7} {r['leftovers']:>8} {r['p50']:>6.2f} {r['wall']:>6.1f} "
              f"{'v' + r['final']:>5}  {r['seen']}")
    ok = all(r["ok"] for r in rows)
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
