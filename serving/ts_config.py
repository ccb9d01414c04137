"""TorchServe's config.properties for one instance: the kit's base file (`config.properties` at the repository
root) with the instance's ports, model store, `allowed_urls` and `model_snapshot` filled in.

The snapshot says which models and versions load and which version of each is the default (TorchServe honours
`defaultVersion` only when it restores a snapshot), so the default is chosen by declaration, not by load order,
and holds across restarts. The batch/worker settings come from each variant's
`handlers/model_configs/<variant>.yaml` (a snapshot overrides the archive's model-config.yaml, so the snapshot
carries the same values).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from serving.errors import ServeError
from serving.instance import Instance
from serving.models_file import ModelEntry, read_models
from serving.project import REPO, mar_file_name

BASE_CONFIG = REPO / "config.properties"
SNAPSHOT_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
# What a model archive's file name may contain: no "/", no "%" (Java's file: URL handler, which TorchServe
# opens to copy the archive, decodes %2E%2E and %2F), so a URL that matches names a file directly in the store.
ARCHIVE_NAME = r"[A-Za-z0-9_.-]+\.mar"


def model_snapshot(entries: list[ModelEntry], model_store: Path, model_configs: Path,
                   check_archives: bool = True) -> dict[str, Any]:
    """The snapshot of `entries`, their archives in `model_store`. `check_archives` False: the store is somewhere
    else (inside an image, `serving.manifests`), so whether its archives exist cannot be checked here."""
    models: dict[str, dict[str, Any]] = {}
    for entry in entries:
        settings = yaml.safe_load((model_configs / f"{entry.variant}.yaml").read_text())
        models[entry.name] = {}
        for version in entry.versions:
            mar = mar_file_name(entry.name, version)
            if check_archives and not (model_store / mar).is_file():
                raise ServeError(f"{model_store / mar} is missing; run `make archive`")
            models[entry.name][version] = {
                "defaultVersion": version == entry.default,
                "marName": mar,
                **{key: settings[key] for key in SNAPSHOT_KEYS},
            }
    count = sum(len(versions) for versions in models.values())
    return {"name": "startup.cfg", "modelCount": count, "models": models}


def allowed_urls(model_store: Path) -> str:
    """The only URLs TorchServe may load a model from: an archive directly in our model store.

    TorchServe 0.12 splits `allowed_urls` on "," and full-matches each part as a Java regex, case-insensitively
    (`ArchiveUtils.validateURL`), before anything else looks at the URL. So the store's path is escaped (a "."
    or "+" in it would match other characters), the pattern is anchored by the full match and case-sensitive,
    and the file name may not reach elsewhere ("../", "%2E%2E/", a subfolder) — CVE-2023-43654 was an SSRF
    through this setting. Checked with TorchServe's own ArchiveUtils.validateURL (see docs/serving.md).
    """
    store = str(model_store)
    if "," in store:
        raise ServeError(f"the model store's path may not contain ',' (TorchServe splits allowed_urls on it): {store}")
    # (?-i:...): TorchServe matches case-insensitively, but on this file system /Store is not /store.
    return f"(?-i:file://{re.escape(store)}/{ARCHIVE_NAME})"


def properties_value(value: str) -> str:
    """`value` as Java's Properties.load reads it back: a backslash starts an escape (an unknown one is
    dropped), so regex backslashes are doubled; a line break would end the value."""
    if "\n" in value or "\r" in value:
        raise ServeError(f"a config.properties value cannot span lines: {value[:80]!r}")
    escaped = value.replace("\\", "\\\\")
    return "\\" + escaped if escaped[:1] in (" ", "\t") else escaped  # leading blanks would be dropped


def render_config(instance: Instance, base_config: Path = BASE_CONFIG, settings: dict[str, str] | None = None,
                  check_archives: bool = True) -> str:
    """`base_config` with this instance's ports, model store and snapshot filled in; `settings` replace more of
    the base file's values (a pod's: token authorization off behind a NetworkPolicy, `serving.manifests`)."""
    ports = instance.ports
    overrides = {
        **(settings or {}),
        "inference_address": instance.inference_url,
        "management_address": instance.management_url,
        "metrics_address": instance.metrics_url,
        # gRPC inference binds where the REST listeners do (the router's gRPC front end forwards to it); gRPC
        # management keeps the base file's loopback address: nothing outside the host needs it.
        "grpc_inference_address": instance.address,
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_port": str(ports.grpc_management),
        "initial_worker_port": str(ports.initial_worker),
        "model_store": str(instance.model_store),
        "allowed_urls": allowed_urls(instance.model_store),
        "model_snapshot": json.dumps(
            model_snapshot(read_models(instance.models_file), instance.model_store, instance.model_configs,
                           check_archives)
        ),
    }
    lines = []
    for line in base_config.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key in overrides and not line.lstrip().startswith("#"):
            continue
        lines.append(line)
    lines.append("# --- rendered by serving.ts_config for this run directory ---")
    lines += [f"{key}={properties_value(value)}" for key, value in overrides.items()]
    return "\n".join(lines) + "\n"


def read_properties(text: str) -> dict[str, str]:
    """key=value lines of a config.properties as TorchServe reads them (for checks; the files we render use
    only `key=value` lines, `#` comments and backslash escapes)."""
    values = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", "!")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        values[key.strip()] = re.sub(r"\\(.)", lambda match: match.group(1), value)
    return values
