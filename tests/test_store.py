"""Artifact stores: the same protocol on a local folder and on a real S3 endpoint (moto server)."""
from __future__ import annotations

import logging
import socket
import time
import urllib.request
from pathlib import Path

import boto3
import pytest

from podium.files import TMP_MARK, atomic_path
from podium.registry.stores import ArtifactStore, LocalStore, S3Store, StoreError, open_store


def _bucket(endpoint: str, name: str = "podium-test") -> str:
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3")
    return S3Store(_bucket(endpoint), "releases/podium")


def test_protocol_roundtrip(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4000)
    store.put_file("m/d/v1/model.onnx", src)
    store.put_bytes("m/d/v1/manifest.json", b"{}")
    store.put_bytes("m/d/current.json", b"{\"version\": 1}")
    store.put_bytes("other/x", b"x")

    assert isinstance(store, ArtifactStore)
    assert store.get_bytes("m/d/v1/manifest.json") == b"{}"
    store.get_file("m/d/v1/model.onnx", tmp_path / "out" / "model.onnx")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == src.read_bytes()
    assert store.exists("m/d/current.json") and not store.exists("m/d/nope")
    assert store.list("m/d/") == ["m/d/current.json", "m/d/v1/manifest.json", "m/d/v1/model.onnx"]
    assert store.list("m/d/v") == ["m/d/v1/manifest.json", "m/d/v1/model.onnx"]
    assert store.list("zzz") == []
    assert len(store.list()) == 4
    store.put_bytes("m/d/current.json", b"{\"version\": 2}")  # overwrite replaces whole object
    assert store.get_bytes("m/d/current.json") == b"{\"version\": 2}"
    store.delete("other/x")
    store.delete("other/x")  # deleting a missing key is fine (as S3)
    assert not store.exists("other/x")


def test_missing_object_is_one_clear_line(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"^no object .*m/d/missing\.bin$") as info:
        store.get_bytes("m/d/missing.bin")
    assert info.value.kind == "missing"
    with pytest.raises(StoreError, match="no object") as info:
        store.get_file("m/d/missing.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.glob("*podium-tmp*")) == []  # no temp file left behind


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", "a\\b", ""])
def test_unsafe_keys_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreError, match="invalid store key"):
        LocalStore(tmp_path).put_bytes(key, b"x")


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a/b.json", b"1")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):  # every store write goes through atomic_path: a write that fails midway
        with atomic_path(tmp_path / "a" / "b.json") as tmp:
            tmp.write_bytes(b"partial")
            raise Boom
    assert store.get_bytes("a/b.json") == b"1"  # the old content survives a failed write
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]
    (tmp_path / "a" / f"{TMP_MARK}b.json.x").write_bytes(b"left by a kill")
    assert store.list("a/") == ["a/b.json"]  # a temp file a killed writer left is never listed


def test_open_store_uris(tmp_path: Path, s3: str) -> None:
    assert isinstance(open_store(tmp_path / "x"), LocalStore)
    local = open_store(f"file://{tmp_path}/y")
    assert isinstance(local, LocalStore) and local.root == tmp_path / "y"
    assert local.uri == (tmp_path / "y").as_uri()
    remote = open_store("s3://my-bucket/a/b/")
    assert isinstance(remote, S3Store) and remote.bucket == "my-bucket" and remote.prefix == "a/b"
    assert remote.uri == "s3://my-bucket/a/b" and remote.endpoint_url == s3  # from AWS_ENDPOINT_URL
    assert open_store("s3://my-bucket", "http://127.0.0.1:1").endpoint_url == "http://127.0.0.1:1"
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="names no bucket"):
        open_store("s3:///x")


def test_unreachable_endpoint_fails_fast_with_one_line(s3: str) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = open_store("s3://podium-test/x", f"http://127.0.0.1:{port}", max_attempts=1, connect_timeout=1)
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.get_bytes("m/d/current.json")
    assert str(info.value) == f"S3 endpoint http://127.0.0.1:{port} is unreachable"
    assert info.value.kind == "unreachable"
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no botocore chain
    with pytest.raises(StoreError, match="unreachable"):
        store.exists("k")
    assert time.monotonic() - start < 30  # generous: only guards against minutes of retries


def test_missing_bucket(s3: str, tmp_path: Path) -> None:
    store = S3Store("no-such-bucket", "p")
    for call in (lambda: store.get_bytes("k"), lambda: store.put_bytes("k", b"x"), lambda: store.list(""),
                 lambda: store.exists("k"), lambda: store.get_file("k", tmp_path / "k")):
        with pytest.raises(StoreError) as info:
            call()
        assert str(info.value) == "S3 bucket 'no-such-bucket' does not exist"
        assert info.value.kind == "no_bucket"
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StoreError, match="^S3 bucket 'no-such-bucket' does not exist$"):
        store.put_file("k", src)


def test_rejected_credentials_are_named_without_leaking_them(s3: str, monkeypatch, caplog) -> None:
    _bucket(s3)
    secret, key_id = "Sup3rSecretValueNobodyMayPrint", "AKIAPODIUMTESTFAKE01"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG, logger="podium")
    # enable moto auth only after the bucket exists
    urllib.request.urlopen(urllib.request.Request(f"{s3}/moto-api/reset-auth", data=b"0", method="POST",
                                                  headers={"Content-Type": "text/plain"}))
    try:
        store = S3Store("podium-test", "p", max_attempts=1)
        with pytest.raises(StoreError) as info:
            store.get_bytes("m/d/current.json")
        with pytest.raises(StoreError) as info_put:
            store.put_bytes("m/d/current.json", b"{}")
    finally:
        urllib.request.urlopen(urllib.request.Request(f"{s3}/moto-api/reset-auth", data=b"inf", method="POST",
                                                      headers={"Content-Type": "text/plain"}))
    for exc in (info.value, info_put.value):
        assert str(exc).startswith("S3 credentials rejected for bucket 'podium-test'")
        assert exc.kind == "credentials"
        assert "\n" not in str(exc)
        assert secret not in str(exc) and key_id not in str(exc)
    assert secret not in caplog.text and key_id not in caplog.text
