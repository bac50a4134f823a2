"""Screenshots of what an MLflow user sees of a retrain: the run page and the registered model page.

Starts ``mlflow server`` on 127.0.0.1 (a free port) over a tracking database (default: the demo's
``mlflow.db`` with its ``mlartifacts/``; run ``make demo`` first), finds the newest retrain run and the
registered model, and saves headless-Chromium screenshots (Playwright) to ``--out``:

- ``run-overview.png``: the run page (name, parameters, the dataset input, tags such as the commit);
- ``run-metrics.png``: its model metrics tab (the training curves);
- ``run-artifacts.png``: its artifacts (report/, data/, lineage/);
- ``model.png``: the registered model with its aliases per device and versions;
- ``model-version.png``: the champion version of the first device (description = model card, source).

Not part of CI. It needs Playwright and a Chromium: ``.venv/bin/pip install playwright &&
.venv/bin/playwright install chromium`` (the browser is downloaded from Playwright's CDN; where that is
unreachable, point ``--chromium`` at an installed Chromium or Chrome).

    .venv/bin/python bench/ui_screenshots.py [--db mlflow.db] [--artifacts mlartifacts] [--out .podium/ui]
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE_TIMEOUT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(db: Path, artifacts: Path) -> Iterator[str]:
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{db.resolve()}", "--artifacts-destination", str(artifacts.resolve()),
           "--serve-artifacts", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"error: mlflow server on {url} did not answer /health within 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def pages(url: str, model: str | None) -> list[tuple[str, str]]:
    """(file name, URL) of each page to capture, from the newest run and the registered model."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1,
                                                                                order_by=["attributes.start_time DESC"])]
    if not runs:
        raise SystemExit(f"error: no run in {url}: run `make demo` first")
    run = max(runs, key=lambda r: r.info.start_time)
    base = f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    shots = [("run-overview.png", base), ("run-metrics.png", f"{base}/model-metrics"),
             ("run-artifacts.png", f"{base}/artifacts")]
    names = [m.name for m in client.search_registered_models()]
    name = model or next((n for n in names if "-anchor-" not in n and "-teacher-" not in n), None)
    if name is not None:
        shots.append(("model.png", f"{url}/#/models/{name}"))
        aliases = client.get_registered_model(name).aliases
        if aliases:
            version = next(iter(aliases.values()))
            shots.append(("model-version.png", f"{url}/#/models/{name}/versions/{version}"))
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=REPO / "mlflow.db")
    parser.add_argument("--artifacts", type=Path, default=REPO / "mlartifacts")
    parser.add_argument("--model", default=None, help="registered model (default: the first winner model)")
    parser.add_argument("--out", type=Path, default=REPO / ".podium" / "ui")
    parser.add_argument("--chromium", default=None, help="a Chromium/Chrome executable (default: Playwright's)")
    args = parser.parse_args()
    if not args.db.is_file():
        raise SystemExit(f"error: no tracking database at {args.db}: run `make demo` first")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit("error: Playwright is not installed: .venv/bin/pip install playwright && "
                         ".venv/bin/playwright install chromium") from None
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_server(args.db, args.artifacts) as url, sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=args.chromium)
        except Exception as exc:  # noqa: BLE001 - the one line a user needs
            raise SystemExit(f"error: no Chromium to launch ({' '.join(str(exc).split())[:200]}); "
                             "run `.venv/bin/playwright install chromium` or pass --chromium") from None
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        for file_name, page_url in pages(url, args.model):
            page.goto(page_url, timeout=PAGE_TIMEOUT_MS)
            page.wait_for_load_state("networkidle", timeout=PAGE_TIMEOUT_MS)
            page.screenshot(path=str(args.out / file_name), full_page=True)
            print(f"{file_name}: {page_url}")
        browser.close()
    print(f"screenshots in {args.out}")


if __name__ == "__main__":
    main()
