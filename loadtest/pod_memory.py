"""The memory a TorchServe pod needs for what `make serve` loads: the frontend's and every model worker's
proportional set size (PSS), after each declared model has answered `--requests` requests.

RSS counts the torch and ONNX Runtime libraries each worker maps once per worker; a pod's memory cgroup is charged
for a shared page once, and PSS (a shared page divided among the processes that map it) adds up to that.
deploy/k8s/base/torchserve.yaml sizes the TorchServe pod from these figures, and tests/test_deploy.py checks that
the declared workers still fit.

Usage (after `make serve`):
    python -m loadtest.pod_memory                    # -> reports/pod-memory.md
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import requests

from loadtest.workload import REPO, model_workers, resident_mb
from serving import server
from serving.client import prediction_path
from serving.models_file import DEFAULT_MODELS_FILE, read_models

log = logging.getLogger(__name__)


def proportional_mb(pid: int) -> float:
    """A live process's proportional set size in MiB (Linux: /proc/PID/smaps_rollup)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError as error:
        raise ProcessLookupError(f"no process {pid}") from error
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Pss line")


@dataclass(frozen=True)
class PodMemory:
    workers: int
    workers_pss_mb: float
    workers_rss_mb: float
    frontend_pss_mb: float

    @property
    def total_mb(self) -> float:
        return self.workers_pss_mb + self.frontend_pss_mb

    def markdown(self, models: list[str], requests_each: int) -> str:
        return "\n".join([
            f"# TorchServe pod memory ({len(models)} models: {', '.join(models)}; {requests_each} requests each)",
            "",
            "| | processes | PSS MiB | RSS MiB |",
            "|---|---|---|---|",
            f"| model workers | {self.workers} | {self.workers_pss_mb:,.0f} | {self.workers_rss_mb:,.0f} |",
            f"| frontend | 1 | {self.frontend_pss_mb:,.0f} | |",
            f"| the pod's processes | {self.workers + 1} | {self.total_mb:,.0f} | |",
            "",
            f"PSS per worker: {self.workers_pss_mb / max(self.workers, 1):,.0f} MiB. RSS counts each worker's shared "
            "libraries again; a pod's memory cgroup is charged for them once.",
        ])


def measure(instance: server.Instance, image: Path, requests_each: int) -> tuple[list[str], PodMemory]:
    frontend = server.running_pid(instance)
    if frontend is None:
        raise SystemExit("TorchServe is not running: run `make serve` first")
    body = image.read_bytes()
    headers = {**instance.headers(), "Content-Type": "image/png"}
    models = [entry.name for entry in read_models(DEFAULT_MODELS_FILE)]
    with requests.Session() as session:
        for model in models:  # bounded: requests_each per model, each with a timeout
            for _ in range(requests_each):
                response = session.post(instance.inference_url + prediction_path(model, None), data=body,
                                        headers=headers, timeout=30)
                response.raise_for_status()
    workers = model_workers(frontend)
    return models, PodMemory(
        workers=len(workers),
        workers_pss_mb=sum(proportional_mb(pid) for pid in workers),
        workers_rss_mb=sum(resident_mb(pid) for pid in workers),
        frontend_pss_mb=proportional_mb(frontend),
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100, help="requests to each declared model first")
    parser.add_argument("--run-dir", type=Path, default=server.DEFAULT_RUN_DIR)
    parser.add_argument("--image", type=Path, default=REPO / "runs" / "examples" / "sneaker.png")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "pod-memory.md")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models, memory = measure(server.running_instance(args.run_dir), args.image, args.requests)
    report = memory.markdown(models, args.requests)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report + "\n")
    log.info("%s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
