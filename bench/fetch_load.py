"""Load test of the release protocol: concurrent verified fetches while a new version is published.

Starts a moto S3 server on 127.0.0.1 (nothing leaves the machine), publishes release v1 (a few
files of 1-5 MB), then runs N fetcher threads that fetch the current release again and again while
another thread publishes v2. Every fetch must end with a complete, checksum-valid release whose
files all belong to the version its manifest names -- each file's first line names the version it
was made for, so a mixed release (v1 model + v2 weights) would be caught. It cannot happen: versions
are immutable, a reader follows current.json to one manifest, and current.json is written last.

    python bench/fetch_load.py [--threads 32] [--max-seconds 300]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from podium.registry.release import ReleaseError, fetch_release, publish_release, read_current  # noqa: E402
from podium.registry.stores import S3Store, StoreError  # noqa: E402

MODEL, DEVICE, BUCKET = "bench-model", "cpu-1t", "podium-bench"
SIZES = {"model.onnx": 5 << 20, "weights.safetensors": 3 << 20, "calibration.bin": 1 << 20, "labels.txt": 64}


def make_release(folder: Path, version: str) -> dict[str, Path]:
    """Files whose first line names their version, then seeded random bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{version}")
    files = {}
    for name, size in SIZES.items():
        header = f"podium-bench version={version} file={name}\n".encode()
        path = folder / name
        path.write_bytes(header + rng.randbytes(max(size - len(header), 0)))
        files[name] = path
    return files


def check_fetched(dest: Path) -> str:
    """Independent check of a fetched release: complete, checksums valid, one version throughout."""
    manifest = json.loads((dest / "manifest.json").read_bytes())
    version = manifest["version"]
    names = sorted(p.name for p in dest.iterdir())
    if names != sorted([*SIZES, "manifest.json"]):
        raise AssertionError(f"incomplete release: {names}")
    for entry in manifest["files"]:
        data = (dest / entry["name"]).read_bytes()
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise AssertionError(f"{entry['name']}: checksum mismatch")
        head = data.split(b"\n", 1)[0].decode()
        if head != f"podium-bench version={version} file={entry['name']}":
            raise AssertionError(f"mixed release: manifest v{version} but {entry['name']} says {head!r}")
    return version


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
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--min-fetches", type=int, default=2, help="fetches per thread at least")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="hard bound on the fetch phase")
    args = parser.parse_args()

    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    for var, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[var] = value
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_PROFILE", None)

    server, url = start_moto()
    try:
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(prefix="podium-fetch-load-") as tmp:
            root = Path(tmp)
            publisher_store = S3Store(BUCKET, "releases", url)
            v1 = make_release(root / "src-v1", "1")
            v2 = make_release(root / "src-v2", "2")
            t0 = time.perf_counter()
            publish_release(publisher_store, MODEL, DEVICE, 1, v1, {"metrics": {"val_acc": 0.9}})
            publish_v1_s = time.perf_counter() - t0

            publish_done = threading.Event()
            deadline = time.monotonic() + args.max_seconds
            lock = threading.Lock()
            results: list[tuple[int, str | None, str | None, float]] = []  # thread, version, error, seconds
            publish_info: dict[str, float] = {}
            spans: list[tuple[float, float]] = []  # (start, end) of every fetch, perf_counter seconds
            start_gate = threading.Barrier(args.threads + 1)

            def fetcher(idx: int) -> None:
                store = S3Store(BUCKET, "releases", url)  # each deployment client has its own connection pool
                dest = root / "deploy" / f"client-{idx:02d}"
                start_gate.wait()
                done, saw_publish_end = 0, False
                # keep fetching until this client has done its minimum AND one fetch that began after v2
                # became current (so every client crosses the switch), bounded by the deadline
                while time.monotonic() < deadline and (done < args.min_fetches or not saw_publish_end):
                    saw_publish_end = publish_done.is_set()
                    t = time.perf_counter()
                    version, error = None, None
                    try:
                        manifest = fetch_release(store, MODEL, DEVICE, dest)
                        version = check_fetched(dest)
                        if version != manifest["version"]:
                            raise AssertionError("fetch returned another manifest than it installed")
                    except (ReleaseError, StoreError, AssertionError, OSError) as exc:
                        error = f"{type(exc).__name__}: {exc}"
                    except Exception as exc:  # noqa: BLE001 - anything else is a failure too, not a dead thread
                        error = f"unexpected {type(exc).__name__}: {exc}"
                    with lock:
                        results.append((idx, version, error, time.perf_counter() - t))
                        spans.append((t, time.perf_counter()))
                    done += 1

            def publisher() -> None:
                start_gate.wait()
                phase_start[0] = time.perf_counter()
                time.sleep(0.5)  # let the fetchers get going on v1 first
                t = time.perf_counter()
                try:
                    publish_release(publisher_store, MODEL, DEVICE, 2, v2, {"metrics": {"val_acc": 0.95}})
                finally:
                    publish_info["publish_v2_s"] = time.perf_counter() - t
                    publish_info["v2_current_at"] = time.perf_counter()
                    publish_info["v2_current_at_s"] = publish_info["v2_current_at"] - phase_start[0]
                    publish_done.set()

            threads = [threading.Thread(target=fetcher, args=(i,), daemon=True) for i in range(args.threads)]
            threads.append(threading.Thread(target=publisher, daemon=True))
            phase_start = [time.perf_counter()]  # reset by the publisher when all clients are ready
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=max(deadline - time.monotonic(), 0) + 60)
            wall = time.perf_counter() - phase_start[0]

            failures = [r for r in results if r[2] is not None]
            seen = Counter(r[1] for r in results if r[1] is not None)
            # a client must never go back to v1 once it saw v2 (current.json only moves forward)
            regressions = 0
            for idx in range(args.threads):
                versions = [r[1] for r in results if r[0] == idx and r[1] is not None]
                regressions += sum(1 for a, b in zip(versions, versions[1:]) if int(b) < int(a))
            latencies = sorted(r[3] for r in results if r[2] is None)
            p50 = latencies[len(latencies) // 2] if latencies else float("nan")
            mb = sum(SIZES.values()) / 2**20
            final = read_current(publisher_store, MODEL, DEVICE)
            switch = publish_info.get("v2_current_at", float("nan"))
            straddling = sum(1 for a, b in spans if a < switch < b)  # in flight when current.json moved

            print(f"\nfetch_load: {args.threads} threads fetching {MODEL}/{DEVICE} ({len(SIZES)} files, "
                  f"{mb:.1f} MB/release) from moto at {url} while v2 is published")
            print(f"{'fetches':>8} {'failures':>9} {'fetches/s':>10} {'MB/s':>7} {'p50 s':>7} {'wall s':>7} "
                  f"{'versions seen':<18} {'in flight at switch':>19} {'regressions':>11}")
            print(f"{len(results):>8} {len(failures):>9} {len(results) / wall:>10.2f} "
                  f"{len(latencies) * mb / wall:>7.1f} {p50:>7.2f} {wall:>7.1f} "
                  f"{', '.join(f'v{v}: {n}' for v, n in sorted(seen.items())):<18} {straddling:>19} {regressions:>11}")
            print(f"publish v1 {publish_v1_s:.2f} s; publish v2 (upload + read-back verify + pointer) "
                  f"{publish_info.get('publish_v2_s', float('nan')):.2f} s, current -> v2 at "
                  f"{publish_info.get('v2_current_at_s', float('nan')):.1f} s into the fetch phase; "
                  f"final current: v{final['version'] if final else '?'}")
            for _, _, error, _ in failures[:5]:
                print(f"  failure: {error}")
            ok = not failures and not regressions and set(seen) == {"1", "2"} and final and final["version"] == "2"
            print("RESULT:", "PASS" if ok else "FAIL")
            return 0 if ok else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
