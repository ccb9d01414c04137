"""The files the Kubernetes manifests take from the repository, rendered into `deploy/k8s/base/generated/`
(git-ignored), which `deploy/k8s/base/kustomization.yaml` turns into ConfigMaps. One source of truth: a weight,
a version or a batch setting changed in the repository changes the manifests the next time this runs.

- `config.properties`: TorchServe's configuration for one pod, rendered by `serving.ts_config` from the
  repository's `config.properties`, `serving/models.yaml` and `handlers/model_configs/` (the same code that
  renders `make serve`'s), with the pod's differences: listeners on every address of the pod, the model store
  inside the image, and token authorization off — the NetworkPolicy lets only the router's pods reach the
  inference, management and gRPC ports (README, threat model; docs/cluster.md, token authorization).
- `router.yaml`: the router replicas' experiment file: `router/experiments.yaml`'s experiments, headers, timeouts
  and circuit breaker as they are, with the TorchServe hosts resolved from the headless Service, the shared
  PostgreSQL store (its URL from a Secret, through the environment) and listeners on every address of the pod.
- `locust-router.yaml`: the same experiments as the Locust pods see the router: its Service's name as the
  address (Locust reads the address, the arms and the override header from it; the client token comes from
  the Secret, through ROUTER_CLIENT_TOKEN).

Usage:
    python -m serving.manifests                                    # into deploy/k8s/base/generated/
    python -m serving.manifests --output DIR [--experiments FILE] [--models-file FILE]
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from router.config import DATABASE_URL_ENV, POSTGRESQL, parse_config
from router.errors import ConfigError
from serving.errors import ServeError
from serving.instance import Instance, Ports
from serving.models_file import DEFAULT_MODELS_FILE, read_models
from serving.project import MODEL_CONFIGS, MODEL_STORE, REPO, mar_file_name
from serving.ts_config import BASE_CONFIG, render_config

log = logging.getLogger(__name__)

OUTPUT = REPO / "deploy" / "k8s" / "base" / "generated"
EXPERIMENTS_FILE = REPO / "router" / "experiments.yaml"
# Where deploy/docker/torchserve.Dockerfile puts things in the image.
POD_HOME = Path("/home/model-server")
POD_MODEL_STORE = POD_HOME / "model-store"
EVERY_ADDRESS = "0.0.0.0"  # inside a pod; the NetworkPolicies say who may connect
# The Services deploy/k8s/base names: the router resolves TorchServe's headless Service (one address per ready
# pod) and Locust reaches the router through its Service. Short names: the pods' DNS search path adds the
# namespace, so the base stays namespace-agnostic.
TORCHSERVE_SERVICE = "torchserve"
ROUTER_SERVICE = "router"
ROUTER_STATE_DIR = "/var/lib/router"  # an emptyDir: pid file, log, tokens.json (the Secret's tokens win)
LOCUST_STATE_DIR = "/tmp/router"  # load_tokens reads (and may create) <state_dir>/tokens.json; the env wins
# Token authorization off: TorchServe writes random keys into each pod and cannot be given one (docs/cluster.md).
POD_SETTINGS = {"disable_token_authorization": "true", "enable_model_api": "false"}
HEADER = "# Rendered by `python -m serving.manifests` from {sources}: edit those, then render again.\n"


@dataclass(frozen=True)
class Sources:
    """The repository files the manifests come from (tests point these at copies)."""

    experiments: Path = EXPERIMENTS_FILE
    models_file: Path = DEFAULT_MODELS_FILE
    model_configs: Path = MODEL_CONFIGS
    base_config: Path = BASE_CONFIG


def pod_instance(sources: Sources) -> Instance:
    """A TorchServe pod as `serving.ts_config` renders instances: TorchServe's default ports on every address of
    the pod, the model store where the image has it."""
    return Instance(POD_HOME, POD_MODEL_STORE, sources.models_file, model_configs=sources.model_configs,
                    address=EVERY_ADDRESS)


def torchserve_properties(sources: Sources) -> str:
    header = HEADER.format(sources=f"{_shown(sources.base_config)}, {_shown(sources.models_file)} and "
                                   f"{_shown(sources.model_configs)}")
    header += ("# For a pod: the values at the end win over the comments above them. Listeners on every address of\n"
               "# the pod and token authorization off; the NetworkPolicy lets only the router's pods reach 8080, 8081\n"
               "# and 7070 (deploy/k8s/base/networkpolicies.yaml). gRPC management stays on loopback.\n")
    # The archives are inside the image, not here: whether the image has them is the image build's check.
    return header + render_config(pod_instance(sources), sources.base_config, POD_SETTINGS, check_archives=False)


def _router_document(experiments: Path, **changes: Any) -> str:
    document: dict[str, Any] = yaml.safe_load(experiments.read_text())
    ports = Ports()  # TorchServe's defaults, as pod_instance has them
    listen = {**(document.get("listen") or {}), **changes.pop("listen")}
    document.update({
        "torchserve": {"resolve": {"name": TORCHSERVE_SERVICE, "inference_port": ports.inference,
                                   "management_port": ports.management, "grpc_port": ports.grpc_inference}},
        "listen": listen,
        **changes,
    })
    document.pop("tokens_file", None)  # the tokens come from a Secret, through ROUTER_CLIENT/ADMIN_TOKEN
    parse_config(document)  # validate what is written (the experiments, above all)
    return HEADER.format(sources=_shown(experiments)) + yaml.safe_dump(document, sort_keys=False)


def router_config(experiments: Path = EXPERIMENTS_FILE) -> str:
    """The router replicas' file: everything `experiments` says, except where TorchServe is (the headless
    Service's addresses, token auth off), where the router listens (every address of its pod), its state
    directory (an emptyDir) and its store (the shared PostgreSQL, URL from the environment: a Secret)."""
    return _router_document(experiments, listen={"host": EVERY_ADDRESS}, state_dir=ROUTER_STATE_DIR,
                            store={"backend": POSTGRESQL, "url_env": DATABASE_URL_ENV})


def locust_router_config(experiments: Path = EXPERIMENTS_FILE) -> str:
    """The router as Locust's pods reach it: its Service's name and ports; Locust never opens the store."""
    return _router_document(experiments, listen={"host": ROUTER_SERVICE}, state_dir=LOCUST_STATE_DIR)


def render(output: Path = OUTPUT, sources: Sources = Sources()) -> list[Path]:
    """Write the generated files into `output`; returns their paths."""
    files = {
        "config.properties": torchserve_properties(sources),
        "router.yaml": router_config(sources.experiments),
        "locust-router.yaml": locust_router_config(sources.experiments),
    }
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = output / name
        path.write_text(text)
        written.append(path)
    return written


def missing_archives(models_file: Path = DEFAULT_MODELS_FILE, model_store: Path = MODEL_STORE) -> list[str]:
    """The archives the snapshot names that `model_store` lacks: the TorchServe image copies them from there."""
    return [mar_file_name(entry.name, version) for entry in read_models(models_file) for version in entry.versions
            if not (model_store / mar_file_name(entry.name, version)).is_file()]


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.manifests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=OUTPUT, help="default deploy/k8s/base/generated")
    parser.add_argument("--experiments", type=Path, default=EXPERIMENTS_FILE)
    parser.add_argument("--models-file", type=Path, default=DEFAULT_MODELS_FILE)
    parser.add_argument("--model-configs", type=Path, default=MODEL_CONFIGS)
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE,
                        help="where the TorchServe image build copies the archives from (checked, not rendered)")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sources = Sources(args.experiments, args.models_file, args.model_configs)
    try:
        for path in render(args.output, sources):
            log.info("wrote %s", path)
        missing = missing_archives(args.models_file, args.model_store)
    except (ServeError, ConfigError, OSError, yaml.YAMLError) as error:
        log.error("%s", error)
        return 1
    if missing:
        # The manifests do not need them; the image does (deploy/docker/torchserve.Dockerfile copies model_store/).
        log.warning("%s lacks %s: run `make archive` before building the TorchServe image",
                    args.model_store, ", ".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
