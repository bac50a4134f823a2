"""The `podium` command: run the pipeline, manage data, inspect spaces, fetch and run released models."""
# Every command imports what it needs inside itself: `podium fetch` and `podium predict` answer in about a
# second, so this module imports only typer and the standard library (torch, Prefect and MLflow take 10+ s
# to import; they belong to the commands that train, track or orchestrate). tests/test_deploy_client.py
# checks it.
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Dataset versioning and import.")
space_app = typer.Typer(no_args_is_help=True, help="Print a method's candidate space without training.")
stack_app = typer.Typer(no_args_is_help=True, help="A local MLflow server and Prefect server in the background.")
app.add_typer(data_app, name="data")
app.add_typer(space_app, name="space")
app.add_typer(stack_app, name="stack")


def _run(action: Callable[[], object]) -> None:
    """Run a command; a known failure prints one line naming the problem and exits non-zero."""
    from podium.errors import PodiumError

    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        action()
    except PodiumError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)


def _project_env(project_dir: Path) -> None:
    """Keep Prefect's ephemeral database inside the project (created: SQLite will not make the folder)."""
    home = Path(os.environ.setdefault("PREFECT_HOME", str(project_dir.resolve() / ".podium" / "prefect")))
    home.mkdir(parents=True, exist_ok=True)


@app.command()
def retrain(config: Path = typer.Option(Path("configs/demo.yaml"), help="pipeline config (YAML)"),
            project_dir: Path = typer.Option(Path("."), help="the repository holding dvc.yaml and data/")) -> None:
    """Run the retrain flow: data → validation → anchors → methods → profiling → registry → store."""

    def action() -> None:
        from podium.config import load_config

        load_config(config)  # a bad config fails before anything is created (Prefect's home included)
        _project_env(project_dir)
        from podium.flows.ephemeral_api import start_early

        start_early()  # the run's Prefect API boots in its own process while the imports below run
        from podium.flows.retrain import run_retrain

        result = run_retrain(str(config), str(project_dir))
        typer.echo("written:")
        for what, where in (result.written or {}).items():
            typer.echo(f"  {what:<9} {where}")

    _run(action)


@app.command()
def validate(config: Path = typer.Option(Path("configs/demo.yaml")), project_dir: Path = typer.Option(Path("."))) -> None:
    """Check a config and its dataset (no training, no registry changes)."""

    def action() -> None:
        from podium.tasks.runs import load_run_config
        from podium.validation import validate_dataset

        cfg, _devices = load_run_config(str(config))
        data = cfg.data
        report = validate_dataset(project_dir / data.path, classes=data.classes, min_per_class=data.min_per_class,
                                  min_side=data.min_side, max_pixels=data.max_pixels, workers=data.num_workers,
                                  facts_cache=project_dir / cfg.runtime.cache_dir / "validation" / "facts.sqlite")
        report.raise_for_failures()
        typer.echo(f"{config}: config valid; dataset {cfg.data.path} passed validation")

    _run(action)


@data_app.command("import")
def data_import(path: Path, name: str = typer.Option(..., help="dataset name: data/<name>"),
                val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                project_dir: Path = typer.Option(Path("."))) -> None:
    """Bring an ImageFolder dataset under data/<name> (split, manifest, DVC-tracked); give the repository a
    default DVC remote outside the working tree when it has none. Lists what it wrote and changed."""

    def action() -> None:
        from podium import dvc_ops
        from podium.data import import_imagefolder

        root = import_imagefolder(path, project_dir, name, val_fraction, test_fraction, seed)
        changes = dvc_ops.ensure_default_remote(project_dir)
        files = dvc_ops.repository_files(project_dir, root)
        typer.echo(f"imported {path} -> {root} (DVC md5 {dvc_ops.dataset_hash(project_dir, root)})")
        typer.echo("written:")
        typer.echo(f"  {'data':<10} {root} (git-ignored: DVC's cache holds it)")
        for file in files:
            typer.echo(f"  {'dvc':<10} {file}")
        for change in changes:
            typer.echo(f"  {'dvc config':<10} {change}")
        typer.echo(f"  {'dvc remote':<10} {dvc_ops.describe_remote(project_dir)}")
        to_commit = " ".join(files + ([dvc_ops.PROJECT_CONFIG] if changes else []))
        typer.echo(f"next: git add {to_commit} && git commit; dvc push")

    _run(action)


@app.command()
def fetch(model: str = typer.Option(...), device: str = typer.Option(...), dest: Path = typer.Option(...),
          store: str = typer.Option("store", help="store URI: a folder or s3://bucket/prefix"),
          endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (else AWS_ENDPOINT_URL)"),
          version: Optional[str] = typer.Option(None, help="a release version (default: current)")) -> None:
    """Download a device's released model, verifying every checksum; writes nothing on a mismatch."""

    def action() -> None:
        from podium.registry.release import fetch_release
        from podium.registry.stores import open_store

        manifest = fetch_release(open_store(store, endpoint_url), model, device, dest, version=version)
        artifact = manifest.get("artifact") or {"runtime": "onnxruntime", "precision": "fp32", "main": "model.onnx"}
        typer.echo(f"fetched {model}/{device} v{manifest['version']} -> {dest}: run {artifact['main']} with "
                   f"{artifact['runtime']} ({artifact['precision']}); files "
                   f"{', '.join(f['name'] for f in manifest['files'])}")

    _run(action)


@app.command()
def predict(images: list[Path] = typer.Argument(..., help="image files to classify"),
            model: str = typer.Option(...), device: str = typer.Option(...),
            store: str = typer.Option("store", help="store URI: a folder or s3://bucket/prefix"),
            endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint (else AWS_ENDPOINT_URL)"),
            version: Optional[str] = typer.Option(None, help="a release version (default: current)"),
            dest: Optional[Path] = typer.Option(None, help="folder the release is fetched into and reused from "
                                                           "[default: .podium/releases/<model>/<device>]"),
            threads: Optional[int] = typer.Option(None, min=1, help="runtime threads (default: the device's)"),
            max_pixels: Optional[int] = typer.Option(None, min=1, help="refuse larger images (default 64 MP)"),
            ) -> None:
    """Classify images with a device's released model: one line per image (path, class, confidence).

    Fetches into --dest or reuses a verified fetch there; runs the release's runtime and preprocessing."""

    def action() -> None:
        from podium.predict import ReleasedModel, check_image_paths, fetch_or_reuse
        from podium.registry.stores import open_store

        paths = check_image_paths(images)  # a typo fails before anything is fetched
        folder = dest or Path(".podium") / "releases" / model / device
        manifest, reused = fetch_or_reuse(open_store(store, endpoint_url), model, device, folder, version=version)
        limits = {} if max_pixels is None else {"max_pixels": max_pixels}
        with ReleasedModel.open(folder, threads, manifest, **limits) as released:
            artifact = manifest.get("artifact") or {}
            typer.echo(f"{model}/{device} v{manifest['version']} ({'reused' if reused else 'fetched'} in {folder}): "
                       f"{artifact.get('main', 'model.onnx')} on {artifact.get('runtime', 'onnxruntime')}", err=True)
            for prediction in released.predict_files(paths):
                typer.echo(f"{prediction.path}\t{prediction.label}\t{prediction.confidence:.4f}")

    _run(action)


@app.command()
def models(config: Path = typer.Option(Path("configs/demo.yaml")), project_dir: Path = typer.Option(Path("."))) -> None:
    """Print each device's champion: version, method, accuracy, p50, data hash, date; settle an
    interrupted promotion and repair a store that disagrees with the registry first."""

    def action() -> None:
        from datetime import datetime, timezone

        from podium.config import load_config
        from podium.registry.mlflow_registry import ModelRegistry

        cfg = load_config(config)
        _require_existing_tracking(cfg.tracking.uri, config)
        registry = ModelRegistry(cfg.tracking.uri, cfg.tracking.artifact_root)
        registry.check_reachable()
        notes = _reconcile_devices(cfg, registry, project_dir)
        typer.echo(f"{'device':<14} {'version':>7} {'method':<12} {'runtime':<12} {'prec':<5} {'val_acc':>7} "
                   f"{'p50 ms':>8} {'data hash':<14} date")
        for device in cfg.devices.use:
            v = registry.version_by_alias(cfg.model_name, device)
            if v is None:
                typer.echo(f"{device:<14} {'-':>7} (no champion)")
                continue
            when = datetime.fromtimestamp(v.creation_timestamp / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
            typer.echo(f"{device:<14} {v.version:>7} {v.tags.get('method', ''):<12} {v.tags.get('runtime', '?'):<12} "
                       f"{v.tags.get('precision', 'fp32'):<5} {float(v.tags.get('val_acc', 'nan')):>7.4f} "
                       f"{float(v.tags.get('p50_ms', 'nan')):>8.3f} {v.tags.get('data_hash', '')[:12]:<14} {when}")
        for note in notes:
            typer.echo(f"note: {note}")

    with _bounded_mlflow_http():
        _run(action)


def _require_existing_tracking(uri: str, config: Path) -> None:
    """A read-only command must not create an empty tracking database or folder where none was."""
    from urllib.parse import urlparse

    from podium.errors import RegistryError

    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path == ":memory:" or Path(path).is_file():
            return
    elif uri.startswith("file:") or "://" not in uri:
        path = urlparse(uri).path if uri.startswith("file:") else uri
        if Path(path).is_dir():
            return
    else:
        return  # a server: check_reachable answers in seconds
    raise RegistryError(f"{config}: tracking.uri {uri}: {path} does not exist (nothing was ever tracked there; "
                        "run `podium retrain` first, or fix the path)")


@contextlib.contextmanager
def _bounded_mlflow_http(timeout_s: int = 5) -> Iterator[None]:
    """MLflow's HTTP client retries for minutes by default; an inspecting command answers in seconds."""
    bounds = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {key: os.environ.get(key) for key in bounds}
    os.environ.update(bounds)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _config_store(cfg, project_dir: Path):
    """The config's artifact store; a relative folder resolves against the project."""
    from podium.registry.stores import open_store

    uri = cfg.store.uri
    if "://" not in uri and not Path(uri).is_absolute():
        uri = str(project_dir / uri)
    return open_store(uri, cfg.store.endpoint_url)


def _reconcile_devices(cfg, registry, project_dir: Path) -> list[str]:
    """Registry and store made to agree for each device, under the promotion lock; one line per repair.
    A promotion in progress elsewhere is left alone (its lock is held)."""
    from podium.registry import promotion
    from podium.registry.store_lock import LockHeld, promotion_lock

    store = _config_store(cfg, project_dir)
    try:
        with promotion_lock(store, cfg.model_name, wait_s=0):
            return [note for device in cfg.devices.use
                    for note in promotion.reconcile(registry, store, cfg.model_name, device)[1]]
    except LockHeld as exc:
        return [f"registry and store not checked: {exc}"]


@app.command()
def rollback(model: str = typer.Option(...), device: str = typer.Option(...),
             config: Path = typer.Option(Path("configs/demo.yaml")),
             project_dir: Path = typer.Option(Path("."))) -> None:
    """Move a device's alias back to the previous champion and make its release current again."""

    def action() -> None:
        from podium.config import load_config
        from podium.registry import promotion
        from podium.registry.mlflow_registry import ModelRegistry
        from podium.registry.store_lock import promotion_lock

        cfg = load_config(config)
        registry = ModelRegistry(cfg.tracking.uri, cfg.tracking.artifact_root)
        store = _config_store(cfg, project_dir)
        with promotion_lock(store, model):
            was, now = promotion.rollback(registry, store, model, device)
        typer.echo(f"{model}@{device}: v{was} -> v{now} (registry alias and store current.json)")

    _run(action)


@space_app.command("show")
def space_show(method: str, config: Path = typer.Option(Path("configs/demo.yaml")),
               project_dir: Path = typer.Option(Path("."))) -> None:
    """Print the size and members of a method's space for the configured anchors/data shape."""

    def action() -> None:
        from podium.config import load_config
        from podium.data import data_shape
        from podium.errors import ConfigError
        from podium.methods.base import AnchorSpec
        from podium.methods.catalog import get_method

        cfg = load_config(config)
        if method not in cfg.methods:
            raise ConfigError(f"method {method!r} is not configured; configured: {', '.join(cfg.methods) or 'none'}")
        anchors = [AnchorSpec(a.name, dict(a.arch)) for a in cfg.anchors]
        shape = data_shape(project_dir / cfg.data.path, cfg.data.classes, cfg.data.image_size)
        rows = get_method(method).describe(cfg.method_config(method), shape, anchors)
        for row in rows:
            typer.echo(json.dumps(row, default=str))
        typer.echo(f"{method}: {len(rows)} rows")

    _run(action)


@app.command("deploy-profiler")
def deploy_profiler(work_pool: str = typer.Option(..., help="the device's Prefect work pool (inventory `work_pool`)"),
                    source: Path = typer.Option(Path("."), help="repository checkout the worker runs the flow from"),
                    ) -> None:
    """Create or update the `profile` deployment that a worker on a remote device runs for its pool."""

    def action() -> None:
        from podium.flows.device_profile import deploy_profiler as deploy

        name = deploy(work_pool, source.resolve())
        typer.echo(f"deployment {name} -> work pool {work_pool}; on the device run: "
                   f"prefect worker start --pool {work_pool} --type process")

    _run(action)


@app.command()
def serve(cron: str = typer.Option(..., help='cron schedule, e.g. "0 3 * * *" (daily at 03:00)'),
          config: Path = typer.Option(Path("configs/demo.yaml"), help="pipeline config (YAML)"),
          project_dir: Path = typer.Option(Path("."), help="the repository holding dvc.yaml and data/"),
          name: str = typer.Option("podium-retrain", help="deployment name")) -> None:
    """Serve the retrain flow on a cron schedule (blocks; Ctrl-C pauses the schedule).

    Scheduled runs end early when the data hash and config equal the last completed run's."""
    _project_env(project_dir)

    def action() -> None:
        from prefect.client.schemas.schedules import CronSchedule

        from podium.flows.retrain import serve_retrain

        try:
            CronSchedule(cron=cron)
        except ValueError:
            raise typer.BadParameter(f"{cron!r} is not a valid cron expression", param_hint="--cron") from None
        typer.echo(f"serving retrain/{name} on cron {cron!r} with {config} (skip_if_unchanged=True)")
        serve_retrain(name, cron, str(config), str(project_dir))

    _run(action)


STACK_DIR = typer.Option(Path(".podium/stack"), "--dir", help="state, pid files and logs of the stack")
MLFLOW_PORT = typer.Option(5000, min=1, max=65535, help="MLflow server port on 127.0.0.1")
PREFECT_PORT = typer.Option(4200, min=1, max=65535, help="Prefect server port on 127.0.0.1")


@stack_app.command("up")
def stack_up(stack_dir: Path = STACK_DIR, mlflow_port: int = MLFLOW_PORT, prefect_port: int = PREFECT_PORT,
             timeout: float = typer.Option(120.0, help="seconds to wait for each server to be healthy")) -> None:
    """Start an MLflow server (SQLite + local artifacts) and a Prefect server on 127.0.0.1; idempotent."""

    def action() -> None:
        from podium.infra import stack

        services = stack.stack_services(stack_dir, mlflow_port, prefect_port)
        for line in stack.up(services, stack_dir, timeout):
            typer.echo(line)
        env = stack.stack_env(services)
        typer.echo("\n# use it from this shell (and from Prefect workers):")
        for key, value in env.items():
            typer.echo(f"export {key}={value}")
        typer.echo(f"# and in the pipeline config:  tracking: {{uri: {env['MLFLOW_TRACKING_URI']}}}")

    _run(action)


def _stack_report(step: str, stack_dir: Path) -> None:
    """Print ``infra.stack.<step>``'s lines for the stack in ``stack_dir``."""

    def action() -> None:
        from podium.infra import stack

        for line in getattr(stack, step)(stack.stack_services(stack_dir), stack_dir):
            typer.echo(line)

    _run(action)


@stack_app.command("down")
def stack_down(stack_dir: Path = STACK_DIR) -> None:
    """Stop the stack's servers (SIGTERM, then SIGKILL) and remove their pid files; idempotent."""
    _stack_report("down", stack_dir)


@stack_app.command("status")
def stack_status(stack_dir: Path = STACK_DIR) -> None:
    """Whether each server of the stack runs and answers its health endpoint."""
    _stack_report("status", stack_dir)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
