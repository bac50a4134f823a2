"""What failures do, end to end through `podium retrain` after a good run has promoted and published
a model per device.

* The bad-input corpus: each bad input ends the command with exit code 1 and one `error:` line
  naming the problem and where it is, and no registry alias or store `current.json` moves.
* Transient service failures are retried by the task that hit them; permanent ones are not, and
  fail only their branch (the other methods still train and the run's report is written)."""
from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml
from prefect import flow, task
from typer.testing import CliRunner

from podium.cli import app
from podium.registry.mlflow_registry import ModelRegistry, RegistryError
from podium.registry.release import read_current
from podium.registry.stores import S3Store, StoreError, open_store
from podium.tasks.common import TRANSIENT_RETRIES, is_transient
from tests.data_corpus import (
    decompression_bomb,
    duplicate_across_splits,
    empty_split,
    too_small,
    truncate_png,
    unknown_label,
    zero_byte_file,
)
from tests.flow_helpers import BUCKET, REPO, STEPS, write_config
from tests.s3_server import free_port

pytestmark = pytest.mark.integration
DEVICES = ("cpu-1t", "cpu-onnx")


def registry_state(services: dict) -> tuple[dict, dict]:
    """Every device's alias and published current.json: what a bad run must leave alone."""
    registry = ModelRegistry(f"sqlite:///{services['root']}/mlflow.db")
    store = open_store(f"s3://{BUCKET}/models", services["endpoint"])
    aliases = {d: getattr(registry.version_by_alias("digits-classifier", d), "version", None) for d in DEVICES}
    return aliases, {d: read_current(store, "digits-classifier", d) for d in DEVICES}


@pytest.fixture(scope="module")
def promoted(prefect_harness, services) -> tuple[dict, tuple[dict, dict]]:
    """A good run (anchors only, no methods: quick) that promoted and published every device."""
    from podium.flows.retrain import run_retrain

    config = write_config(services, services["root"] / "good.yaml", methods={})
    run_retrain(str(config), str(REPO))
    state = registry_state(services)
    assert all(state[0].values()) and all(state[1].values())
    return services, state


def retrain_fails(config: Path, project: Path = REPO) -> str:
    result = CliRunner().invoke(app, ["retrain", "--config", str(config), "--project-dir", str(project)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1, result.output[-3000:]
    assert len(errors) == 1, result.output[-3000:]
    print(errors[0])  # `pytest -rP tests/test_failure_handling.py` lists what each bad input says
    return errors[0]


def edited_config(services: dict, path: Path, edit: Callable[[dict], None]) -> Path:
    config = write_config(services, path, methods={})
    raw = yaml.safe_load(config.read_text())
    edit(raw)
    config.write_text(yaml.safe_dump(raw))
    return config


DATA_CASES = {  # corpus builder -> what the error line must say
    "truncated PNG": (truncate_png, "decodable"),
    "zero-byte file": (zero_byte_file, "size_bytes"),
    "image below data.min_side": (too_small, "min_side"),
    "decompression bomb": (decompression_bomb, "too_large"),
    "label folder not in the class list": (unknown_label, "label"),
    "empty split": (empty_split, "split"),
    "duplicate image across splits": (duplicate_across_splits, "leaked"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_dataset(case: str, promoted, tmp_path: Path) -> None:
    services, before = promoted
    build, column = DATA_CASES[case]
    project = tmp_path / "project"
    shutil.copytree(REPO / "data" / "digits", project / "data" / "digits")
    culprit = build(project / "data" / "digits")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=project, check=True)
    config = edited_config(services, tmp_path / "bad.yaml", lambda raw: raw["data"].update({"stage": None}))

    error = retrain_fails(config, project)

    assert "failed validation" in error and column in error, error
    if case != "empty split":  # an empty split has no file to name: the split is the place
        assert culprit in error, error
    assert registry_state(services) == before


CONFIG_CASES = {
    "NaN in a config number": (lambda raw: raw["runtime"].update({"checkpoint_every_s": float("nan")}),
                               "runtime.checkpoint_every_s"),
    "unknown device name": (lambda raw: raw["devices"].update({"use": ["cpu-1t", "tpu-v9"]}), "tpu-v9"),
    "missing anchor checkpoint": (lambda raw: raw["anchors"][0].update({"name": "resnet-ckpt",
                                                                        "checkpoint": "/nowhere/tiny.safetensors"}),
                                  "/nowhere/tiny.safetensors"),
    "unreachable MLflow URI": (lambda raw: raw["tracking"].update({"uri": f"http://127.0.0.1:{free_port()}"}),
                               "unreachable"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_or_service(case: str, promoted, tmp_path: Path) -> None:
    services, before = promoted
    edit, named = CONFIG_CASES[case]
    error = retrain_fails(edited_config(services, tmp_path / "bad.yaml", edit))
    assert named in error, error
    assert registry_state(services) == before


def _moto_auth(endpoint: str, enabled: bool) -> None:
    """With auth on, moto rejects every key it did not issue (the test keys included)."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0" if enabled else b"inf",
                                                  method="POST", headers={"Content-Type": "text/plain"}))


def test_wrong_s3_credentials_fail_before_any_training(promoted, tmp_path: Path) -> None:
    services, before = promoted
    config = edited_config(services, tmp_path / "bad.yaml", lambda raw: None)
    _moto_auth(services["endpoint"], enabled=True)
    try:
        error = retrain_fails(config)
    finally:
        _moto_auth(services["endpoint"], enabled=False)
    assert f"S3 credentials rejected for bucket '{BUCKET}'" in error or "access denied" in error, error
    assert registry_state(services) == before


# --- transient vs permanent failures ------------------------------------------------------------

@pytest.mark.parametrize("error, transient", [
    (StoreError("S3 endpoint http://127.0.0.1:9 is unreachable", "unreachable"), True),
    (StoreError("S3 upload to s3://b/k failed: the endpoint answered SlowDown", "server"), True),
    (StoreError("S3 credentials rejected for bucket 'b' (InvalidAccessKeyId)", "credentials"), False),
    (StoreError("no object s3://b/k", "missing"), False),
    (RegistryError("MLflow at http://m failed: API request to http://m/api failed with exception "
                   "HTTPConnectionPool: Max retries exceeded (Connection refused)"), True),
    (RegistryError("MLflow at http://m failed: RESOURCE_DOES_NOT_EXIST: Registered Model not found"), False),
    (ConnectionResetError("peer reset"), True),
    (ValueError("stitching anchors must all be CNNs or all ViTs"), False),
])
def test_what_counts_as_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_s3_server_errors_are_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint answering 503 SlowDown (overloaded) is a ``server`` error, worth retrying."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    class Overloaded(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 - the http.server API
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Overloaded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{server.server_port}", max_attempts=1)
        with pytest.raises(StoreError) as info:
            store.put_bytes("m/d/current.json", b"{}")
    finally:
        server.shutdown()
    assert info.value.kind == "server" and info.value.transient, str(info.value)


def test_tasks_retry_transient_failures_only(prefect_harness) -> None:
    assert TRANSIENT_RETRIES["retry_delay_seconds"](3) == [2, 4, 8]  # exponential backoff
    attempts = {"flaky": 0, "broken": 0}

    def flaky() -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise StoreError("S3 endpoint http://127.0.0.1:9 is unreachable", "unreachable")
        return "published"

    def broken() -> str:
        attempts["broken"] += 1
        raise StoreError("S3 credentials rejected for bucket 'b' (InvalidAccessKeyId)", "credentials")

    options = {**TRANSIENT_RETRIES, "retry_delay_seconds": 0}  # the policy, without the wait

    @flow
    def publish() -> tuple:
        good = task(flaky, **options)(return_state=True)
        bad = task(broken, **options)(return_state=True)
        return good.result(), bad.result(raise_on_failure=False)

    good, bad = publish()
    assert good == "published" and attempts["flaky"] == 3
    assert isinstance(bad, StoreError) and attempts["broken"] == 1


def test_failed_method_fails_only_its_branch(promoted, tmp_path: Path) -> None:
    """self_distill cannot start (its anchor's arch differs from its backbone); scaling still trains,
    every device is still decided and reported, and the command exits 1 naming the method."""
    services, _ = promoted
    broken = {"init_from_anchor": "resnet-small", "backbone": {"family": "resnet", "layers": [1, 1, 1, 1],
                                                                "channels": [8, 16, 32, 64]}}
    methods = {"self_distill": {**broken, "train_baseline": False, "train": STEPS}, "scaling": {"scales": [1], "train": STEPS}}
    config = edited_config(services, tmp_path / "branch.yaml", lambda raw: raw.update({"methods": methods}))
    result = CliRunner().invoke(app, ["retrain", "--config", str(config), "--project-dir", str(REPO)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output[-3000:]
    assert errors[0].startswith("error: method self_distill: anchor 'resnet-small' has arch"), errors[0]

    client = ModelRegistry(f"sqlite:///{services['root']}/mlflow.db").client
    run = client.search_runs([client.get_experiment_by_name("it").experiment_id], order_by=["start_time DESC"])[0]
    assert run.info.status == "FAILED" and "completed" not in run.data.tags
    for device in DEVICES:  # every device was still decided and reported, over the healthy branch's candidates
        report = json.loads(Path(client.download_artifacts(run.info.run_id, f"report/{device}.json", str(tmp_path)))
                            .read_text())
        assert any(row["method"] == "scaling" for row in report)
        assert not any(row["method"] == "self_distill" for row in report)
