"""The production topology files agree with each other: compose, inventory, config, prefect.yaml."""
from __future__ import annotations

from pathlib import Path

import yaml

from podium.config import load_config
from podium.devices import load_inventory, select_devices

REPO = Path(__file__).resolve().parents[1]


def test_every_device_pool_has_a_worker_and_the_config_names_the_compose_services() -> None:
    compose = yaml.safe_load((REPO / "infra" / "docker-compose.yml").read_text())
    services = compose["services"]
    cfg = load_config(REPO / "configs" / "production.yaml")
    devices = select_devices(load_inventory(REPO / cfg.devices.inventory), cfg.devices.use, "production.yaml")
    polled = {s["command"].split("--pool ")[1].split()[0] for s in services.values()
              if str(s.get("command", "")).startswith("prefect worker start")}
    retrain_pool = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    assert {d.work_pool for d in devices if d.work_pool} | {retrain_pool} == polled
    assert cfg.runtime.task_runner == "dask" and cfg.runtime.dask_address == "tcp://dask-scheduler:8786"
    hosts = {"mlflow": cfg.tracking.uri, "minio": cfg.store.endpoint_url, "dask-scheduler": cfg.runtime.dask_address}
    assert all(f"//{name}:" in url and name in services for name, url in hosts.items())
    assert cfg.tracking.artifact_root.startswith("s3://") and cfg.store.uri.startswith("s3://")
    assert all("/shared" in str(s.get("volumes", "")) for name, s in services.items() if name.startswith(("dask", "worker")))
