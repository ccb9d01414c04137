"""Rendering TorchServe's configuration and the declared defaults, without starting a server."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import yaml

from serving import server

MODELS = """# comment that must survive
models:
  fashion-full:
    variant: full
    versions: ["1.0", "2.0"]
    default: "1.0"
  fashion-int8:
    variant: int8
    versions: ["1.0"]
    default: "1.0"
"""


def test_switching_the_default_keeps_the_file_as_written(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    server.write_default(models, "fashion-full", "2.0")
    assert models.read_text() == MODELS.replace('default: "1.0"', 'default: "2.0"', 1)
    with pytest.raises(server.ServeError, match=r"no version 3\.0"):
        server.write_default(models, "fashion-full", "3.0")


def test_rendered_config_is_loopback_only_with_the_declared_default(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    store = tmp_path / "store"
    store.mkdir()
    for name in ("fashion-full-v1.0.mar", "fashion-full-v2.0.mar", "fashion-int8-v1.0.mar"):
        (store / name).write_bytes(b"")
    instance = server.Instance(tmp_path / "run", store, models, server.Ports(18080, 18081, 18082, 17070, 17071))
    config = dict(line.split("=", 1) for line in server.render_config(instance).splitlines()
                  if "=" in line and not line.startswith("#"))
    addresses = [config[key] for key in ("inference_address", "management_address", "metrics_address")]
    assert all(address.startswith("http://127.0.0.1:") for address in addresses)
    assert config["grpc_inference_address"] == config["grpc_management_address"] == "127.0.0.1"
    assert config["disable_token_authorization"] == "false" and config["enable_model_api"] == "false"
    assert config["allowed_urls"] == f"file://{store}/.*"
    snapshot = json.loads(config["model_snapshot"])
    assert snapshot["modelCount"] == 3
    assert snapshot["models"]["fashion-full"]["1.0"]["defaultVersion"] is True
    assert snapshot["models"]["fashion-full"]["2.0"]["defaultVersion"] is False
    settings = yaml.safe_load((server.MODEL_CONFIGS / "full.yaml").read_text())
    assert snapshot["models"]["fashion-full"]["2.0"]["batchSize"] == settings["batchSize"]


def test_a_missing_archive_is_named(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(MODELS)
    instance = server.Instance(tmp_path / "run", tmp_path, models)
    with pytest.raises(server.ServeError, match=r"fashion-full-v1\.0\.mar is missing; run `make archive`"):
        server.render_config(instance)


def test_keys_close_to_expiry_are_renewed() -> None:
    now = datetime.datetime.now(datetime.UTC)
    assert server.expires_soon((now + datetime.timedelta(seconds=30)).isoformat().replace("+00:00", "Z"))
    assert not server.expires_soon((now + datetime.timedelta(minutes=30)).isoformat().replace("+00:00", "Z"))
    assert not server.expires_soon(None)
