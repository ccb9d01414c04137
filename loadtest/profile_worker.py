"""Where a serving worker's CPU goes under load: py-spy samples one TorchServe worker while wrk drives its model.

Each sample of the worker's Python stack (busy samples only: py-spy leaves out a thread waiting in a system call,
so the worker blocked on its socket between batches is not counted) is put in the first category, from the
innermost frame outwards, that one of its frames belongs to:

  model       the forward pass (fashion_cnn, torch.nn, ONNX Runtime's session)
  decoding    our request decoding (handlers/request_decoding.py, image_decoding.py, PIL, json's decoder)
  encoding    our answers (the handler's postprocess, json's encoder)
  handler     the rest of our handler (batching the tensors, softmax, splitting rows, its glue)
  metrics     TorchServe's per-batch metrics (HandlerTime, PredictionTime, ...: a log line each, to the frontend)
  torchserve  the rest of TorchServe's worker loop and protocol (reading and parsing the frontend's messages,
              writing the answers back)
  other       anything else

µs per request = the category's share of the sampled worker's busy samples × the CPU time all of the model's
workers used over the sampled window (psutil, timed around it) ÷ the requests served in that window (wrk's
rate × the window). Beside it, the CPU per request of TorchServe's Java frontend over the same window (all its
threads; it also serves any other traffic then). py-spy must be able to attach (root, or ptrace allowed). Writes
reports/profile-<model>.md. Usage, against `make serve`'s stack:

    .venv/bin/python -m loadtest.profile_worker --model fashion-int8 [--duration-s 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from loadtest.router_overhead import wrk
from serving import server
from serving.client import Client, prediction_path
from serving.project import REPO

log = logging.getLogger("loadtest.profile_worker")

# (category, substrings of a frame "function (file:line)" that place a sample in it), innermost match wins
CATEGORIES = (
    ("model", ("fashion_cnn.py", "torch/nn/", "onnxruntime", "torch/ao/", "torch/jit/")),
    ("decoding", ("request_decoding.py", "image_decoding.py", "PIL/", "json/decoder.py")),
    ("encoding", ("postprocess", "json/encoder.py")),
    ("handler", ("fashion_handler.py", "open_inference.py", "invalid_input.py")),
    ("metrics", ("ts/metrics/",)),
    ("torchserve", ("ts/",)),
)
OTHER = "other"


def categorize(stack: list[str]) -> str:
    """The category of one sample: its innermost frame that belongs to one."""
    for frame in reversed(stack):
        for category, markers in CATEGORIES:
            if any(marker in frame for marker in markers):
                return category
    return OTHER


def read_raw(path: Path) -> Counter[str]:
    """py-spy's raw (collapsed) output, `frame;frame;...;frame count` per line → samples per category."""
    samples: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[categorize(stack.split(";"))] += int(count)
    return samples


def worker_pids(instance: server.Instance, model: str) -> list[int]:
    with Client(instance, request_timeout_s=5.0) as client:
        described = client.describe(model) or []
    return [int(worker["pid"]) for entry in described for worker in entry.get("workers", []) if worker.get("pid")]


def profile(instance: server.Instance, model: str, image: Path, duration_s: float, connections: int,
            rate: int) -> dict[str, object]:
    frontend_pid = server.running_pid(instance)
    pids = worker_pids(instance, model)
    if frontend_pid is None or not pids:
        raise RuntimeError(f"{model} has no worker with a pid: is it served by a running TorchServe?")
    workers, frontend = [psutil.Process(pid) for pid in pids], psutil.Process(frontend_pid)
    url = instance.inference_url + prediction_path(model, None)
    headers = {**instance.headers(), "Content-Type": "image/png"}
    wrk(url, headers, image, connections, 3.0)  # warm workers
    load: dict[str, tuple[float, float, float, int]] = {}
    # wrk runs a little longer than the sampling, so every sample is taken under load.
    driver = threading.Thread(target=lambda: load.setdefault("wrk", wrk(url, headers, image, connections,
                                                                          duration_s + 2.0)))
    driver.start()
    time.sleep(1.0)

    def cpu_s(processes: list[psutil.Process]) -> float:
        return sum(sum(process.cpu_times()[:2]) for process in processes)

    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "profile.txt"
        started, workers_before, frontend_before = time.perf_counter(), cpu_s(workers), cpu_s([frontend])
        spy = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pids[0]),
                              "--duration", f"{duration_s:g}", "--rate", str(rate), "--format", "raw",
                              "--nonblocking", "--output", str(raw)], capture_output=True, text=True)
        window_s = time.perf_counter() - started
        workers_s, frontend_s = cpu_s(workers) - workers_before, cpu_s([frontend]) - frontend_before
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy could not sample pid {pids[0]} (it needs root or ptrace): {spy.stderr}")
        samples = read_raw(raw)
    driver.join()
    requests_per_s = load["wrk"][0]
    served = requests_per_s * window_s
    total = sum(samples.values()) or 1
    rows = {category: {"share": samples[category] / total,
                       "us_per_request": samples[category] / total * workers_s / served * 1e6}
            for category in [*(name for name, _ in CATEGORIES), OTHER]}
    return {"model": model, "workers": len(pids), "requests_per_s": requests_per_s, "cpu_s": workers_s,
            "window_s": window_s, "samples": total, "duration_s": duration_s, "rows": rows,
            "cpu_us_per_request": workers_s / served * 1e6, "frontend_us_per_request": frontend_s / served * 1e6}


def markdown(result: dict[str, object], command: str) -> str:
    rows = result["rows"]
    assert isinstance(rows, dict)
    lines = [f"# Where a worker's CPU goes: {result['model']}\n",
             f"`{command}`: py-spy sampled one of {result['workers']} workers for {result['duration_s']:g} s "
             f"({result['samples']} busy samples) while wrk sent {result['requests_per_s']:.0f} req/s; over the "
             f"{result['window_s']:.1f} s window the workers used {result['cpu_s']:.2f} CPU s, "
             f"{result['cpu_us_per_request']:.0f} µs per request, and TorchServe's Java frontend "
             f"{result['frontend_us_per_request']:.0f} µs per request.\n",
             "| where | share of the worker's CPU | µs per request |", "|---|---|---|",
             *(f"| {category} | {row['share'] * 100:.1f} % | {row['us_per_request']:.0f} |"
               for category, row in rows.items())]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion-int8")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--run-dir", type=Path, default=server.DEFAULT_RUN_DIR)
    parser.add_argument("--image", type=Path, default=REPO / "runs" / "examples" / "sneaker.png")
    parser.add_argument("--output", type=Path, default=None, help="default: reports/profile-<model>.md")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    instance = server.running_instance(args.run_dir)
    result = profile(instance, args.model, args.image, args.duration_s, args.connections, args.rate)
    output = args.output or REPO / "reports" / f"profile-{args.model}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    report = markdown(result, "python -m loadtest.profile_worker " + " ".join(sys.argv[1:]))
    output.write_text(report)
    log.info("%s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
