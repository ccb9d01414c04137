"""`make bench`: the kit's performance claims, each a ratio measured in one run on this machine.

(a) serving efficiency: each variant's served throughput (wrk, REST PNG, against `make serve`'s TorchServe)
    ÷ its in-process throughput at the served batch size (the handler's own decoding + forward, one process per
    worker with the worker's thread count, all running at once);
(b) router ÷ direct throughput, the router's added p50 and p99 (closed loop, and REST at a fixed 200 req/s)
    and its CPU per request, REST and gRPC, against its hot-path targets (loadtest.router_overhead);
(c) our handler ÷ TorchServe's stock image classifier (`ts.torch_handler.image_classifier.ImageClassifier`,
    given this model's transforms) on the same full model and settings, each in its own fresh TorchServe,
    measured in alternating rounds;
(d) Locust's REST numbers against wrk's on the same target;
plus the tuning sweep of the full model's workers × threads, batch size and batch delay.

Writes reports/bench.md (and .json). Usage:
    make serve && make bench
    .venv/bin/python -m loadtest.bench [--duration-s 8] [--skip tuning stock]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loadtest.router_overhead import summarize as overhead_table
from loadtest.router_overhead import wrk
from loadtest.workload import REPO, read_samples, summarize, test_items
from serving import server
from serving.archive import MODEL_CONFIGS, VARIANTS, build_archive, model_name
from serving.client import prediction_path

log = logging.getLogger("loadtest.bench")

CONNECTIONS = 32
WARM_UP_S = 3.0
STOCK_HANDLER = '''"""TorchServe's stock image classifier with this model's transforms (28x28 grayscale, normalized)."""
import fashion_cnn
from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class StockImageClassifier(ImageClassifier):
    topk = 3
    image_processing = transforms.Compose([
        transforms.Grayscale(),
        transforms.Resize((fashion_cnn.IMAGE_SIZE, fashion_cnn.IMAGE_SIZE)),
        transforms.ToTensor(),
        transforms.Normalize(fashion_cnn.DATASETS["fashion-mnist"].mean, fashion_cnn.DATASETS["fashion-mnist"].std),
    ])
'''
STOCK_MODEL = '''"""The full CNN with a constructor without arguments, as TorchServe's stock eager loader needs."""
import fashion_cnn


class StockFashionCNN(fashion_cnn.FashionCNN):
    def __init__(self) -> None:
        super().__init__(fashion_cnn.FULL_CONFIG)
'''


@dataclass(frozen=True)
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def rest_load(instance: server.Instance, model: str, image: Path, duration_s: float,
              connections: int = CONNECTIONS) -> Load:
    return Load(*wrk(instance.inference_url + prediction_path(model, None),
                     {**instance.headers(), "Content-Type": "image/png"}, image, connections, duration_s))


# --- (a) in-process throughput at the served batch size --------------------------------------------------------
def _in_process_worker(args: tuple[str, str, int, int, float, list[bytes]]) -> int:
    weights, model_format, batch_size, threads, duration_s, bodies = args
    import torch

    sys.path.insert(0, str(REPO / "handlers"))
    from request_decoding import image_to_pixels

    import fashion_cnn

    torch.set_num_threads(threads)
    model = fashion_cnn.load_model(weights, model_format)
    images = 0
    deadline = time.perf_counter() + duration_s
    with torch.inference_mode():
        while time.perf_counter() < deadline:
            batch = torch.stack([image_to_pixels(bodies[(images + i) % len(bodies)]).float()
                                 for i in range(batch_size)])
            model(fashion_cnn.normalize(batch))
            images += batch_size
    return images


def in_process_throughput(variant: str, checkpoints: Path, duration_s: float,
                          bodies: list[bytes]) -> tuple[float, dict[str, Any]]:
    """Images/s of `workers` processes × `threads` threads, decoding PNGs and running batches of `batchSize`."""
    settings = yaml.safe_load((MODEL_CONFIGS / f"{variant}.yaml").read_text())
    workers, threads = settings["minWorkers"], settings.get("handler", {}).get("threads", 1)
    card = json.loads((checkpoints / f"{variant}.card.json").read_text())
    job = (str(checkpoints / f"{variant}.pt"), card["format"], settings["batchSize"], threads, duration_s, bodies)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_in_process_worker, [(*job[:4], 1.0, bodies)] * workers)  # warm-up: imports, first batches
        images = sum(pool.map(_in_process_worker, [job] * workers))
    return images / duration_s, {"workers": workers, "threads": threads, "batch": settings["batchSize"]}


# --- extra TorchServe instances (stock handler, tuning) ---------------------------------------------------------
def start_instance(root: Path, name: str, mar: Path, settings: dict[str, Any], env: dict[str, str]) -> server.Instance:
    store, configs = root / "store", root / "configs"
    store.mkdir(parents=True, exist_ok=True)
    configs.mkdir(exist_ok=True)
    shutil.copy(mar, store / f"{name}-v1.0.mar")
    (configs / "bench.yaml").write_text(yaml.safe_dump(settings))
    models = root / "models.yaml"
    models.write_text(yaml.safe_dump({"models": {name: {"variant": "bench", "versions": ["1.0"], "default": "1.0"}}}))
    ports = server.Ports(*server.free_ports(6))
    instance = server.Instance(root / "run", store, models, ports, model_configs=configs)
    server.start(instance, timeout=180, env=env)
    # first batches are slow (allocations, oneDNN kernels): measure warm workers, as `make serve` has
    rest_load(instance, name, REPO / "runs" / "examples" / "sneaker.png", WARM_UP_S)
    return instance


def stock_archive(checkpoints: Path, folder: Path) -> Path:
    import torch

    import fashion_cnn

    payload = torch.load(checkpoints / "full.pt", map_location="cpu", weights_only=True)
    (folder / "stock_handler.py").write_text(STOCK_HANDLER)
    (folder / "stock_model.py").write_text(STOCK_MODEL)
    torch.save(payload["state_dict"], folder / "weights.pt")  # the stock loader wants a plain state_dict
    (folder / "index_to_name.json").write_text(json.dumps(
        {str(i): name for i, name in enumerate(fashion_cnn.DATASETS["fashion-mnist"].classes)}))
    subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", "fashion-stock",
                    "--version", "1.0", "--model-file", str(folder / "stock_model.py"),
                    "--serialized-file", str(folder / "weights.pt"), "--handler", str(folder / "stock_handler.py"),
                    "--extra-files", f"{REPO / 'fashion_cnn.py'},{folder / 'index_to_name.json'}",
                    "--export-path", str(folder), "--force"], check=True, capture_output=True)
    return folder / "fashion-stock.mar"


def handler_comparison(checkpoints: Path, image: Path, duration_s: float, rounds: int) -> dict[str, Any]:
    settings = {key: value for key, value in yaml.safe_load((MODEL_CONFIGS / "full.yaml").read_text()).items()
                if key != "handler"}
    results: dict[str, list[Load]] = {"ours": [], "stock": []}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        ours_mar = build_archive("full", "1.0", checkpoints, root / "ours-mar")
        stock_mar = stock_archive(checkpoints, root)
        # Both get one torch thread per worker: ours through its model config, the stock handler (which sets
        # none) through OMP_NUM_THREADS — the stock configuration's best measured setting (FACTS).
        ours = start_instance(root / "ours", "fashion-full", ours_mar, settings, {})
        stock = start_instance(root / "stock", "fashion-stock", stock_mar, settings, {"OMP_NUM_THREADS": "1"})
        try:
            for _ in range(rounds):
                results["ours"].append(rest_load(ours, "fashion-full", image, duration_s))
                results["stock"].append(rest_load(stock, "fashion-stock", image, duration_s))
        finally:
            server.stop(ours)
            server.stop(stock)
    return {name: median_load(loads) for name, loads in results.items()}


def median_load(loads: list[Load]) -> dict[str, float]:
    import statistics

    return {"requests_per_s": statistics.median(load.requests_per_s for load in loads),
            "p50_ms": statistics.median(load.p50_ms for load in loads),
            "p99_ms": statistics.median(load.p99_ms for load in loads),
            "errors": sum(load.errors for load in loads)}


TUNING = [  # (workers, threads per worker, batch size, max batch delay ms)
    (2, 1, 8, 5), (2, 1, 16, 5), (2, 1, 32, 5), (2, 1, 16, 2), (2, 1, 16, 10), (1, 2, 16, 5), (4, 1, 16, 5),
]


def tuning_sweep(checkpoints: Path, image: Path, duration_s: float) -> list[dict[str, Any]]:
    """The full model in a fresh TorchServe per setting (fresh instances run slower than a long-warm one, so
    compare these rows with each other, not with (a))."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for index, (workers, threads, batch, delay) in enumerate(TUNING):
            settings = {"minWorkers": workers, "maxWorkers": workers, "batchSize": batch, "maxBatchDelay": delay,
                        "responseTimeout": 30, "handler": {"threads": threads}}
            config = root / f"t{index}.yaml"
            config.write_text(yaml.safe_dump(settings))  # threads reach the handler through the archive's config
            mar = build_archive("full", "1.0", checkpoints, root / f"mar{index}", model_config=config)
            instance = start_instance(root / f"t{index}", "fashion-full", mar, settings, {})
            try:
                load = rest_load(instance, "fashion-full", image, duration_s)
            finally:
                server.stop(instance)
            rows.append({"workers": workers, "threads": threads, "batch": batch, "delay_ms": delay,
                         **load.__dict__})
            log.info("tuning %s", rows[-1])
    return rows


# --- (d) Locust against wrk --------------------------------------------------------------------------------------
def locust_vs_wrk(instance: server.Instance, image: Path, duration_s: float, out: Path) -> dict[str, Any]:
    wrk_load = rest_load(instance, model_name("full"), image, duration_s)
    prefix = out / "locust-crosscheck" / "samples"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for stale in prefix.parent.glob("samples.*"):
        stale.unlink()
    subprocess.run([sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "--only-summary",
                    "-u", str(CONNECTIONS), "-r", str(CONNECTIONS), "-t", f"{duration_s + 1:g}s",
                    "--target", "direct", "--variant", "full", "--samples", str(prefix), "RestUser"],
                   cwd=REPO, check=True, capture_output=True)
    summary = summarize(read_samples(prefix.parent.glob("samples.*.csv")))["Aggregated"]
    return {"wrk": wrk_load.__dict__, "locust": {"requests_per_s": summary["throughput"],
                                                  "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"],
                                                  "errors": summary["failures"]}}


def load_rows(label: str, loads: dict[str, dict[str, float]]) -> list[str]:
    """A Markdown table of named loads: req/s, p50, p99, errors."""
    return [f"| {label} | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|",
            *(f"| {name} | {load['requests_per_s']:.0f} | {load['p50_ms']:.1f} | {load['p99_ms']:.1f} | "
              f"{load['errors']} |" for name, load in loads.items())]


def markdown(results: dict[str, Any], command: str) -> str:
    full = results["served"]["full"]["requests_per_s"]
    lines = [f"# Benchmark\n\n`{command}` on this machine (2 cores), torch {importlib.metadata.version('torch')}, "
             f"TorchServe {importlib.metadata.version('torchserve')}; REST load from wrk at {CONNECTIONS} "
             "connections, 28×28 PNG bodies.\n",
             "## (a) Serving efficiency and variants\n",
             "| variant | served req/s | p50 ms | p99 ms | in-process img/s (workers × threads, batch) | efficiency "
             "| vs full |", "|---|---|---|---|---|---|---|"]
    for variant in results["served"]:
        served, inproc = results["served"][variant], results["in_process"][variant]
        lines.append(f"| {variant} | {served['requests_per_s']:.0f} | {served['p50_ms']:.1f} | {served['p99_ms']:.1f} "
                     f"| {inproc['images_per_s']:.0f} ({inproc['workers']} × {inproc['threads']}, "
                     f"{inproc['batch']}) | {served['requests_per_s'] / inproc['images_per_s']:.2f} | "
                     f"{served['requests_per_s'] / full:.2f}× |")
    if "router" in results:
        lines += ["", "## (b) Router against direct (same model, pinned arm)\n", results["router"]]
    if "handlers" in results:
        ours, stock = results["handlers"]["ours"], results["handlers"]["stock"]
        lines += ["", "## (c) Our handler against TorchServe's stock image classifier (full model, same settings)\n",
                  *load_rows("handler", {"ours": ours, "stock `ImageClassifier`": stock}),
                  f"\nOurs ÷ stock: {ours['requests_per_s'] / stock['requests_per_s']:.2f}× throughput, p99 "
                  f"{ours['p99_ms']:.1f} vs {stock['p99_ms']:.1f} ms."]
    if "crosscheck" in results:
        wrk_run, locust_run = results["crosscheck"]["wrk"], results["crosscheck"]["locust"]
        lines += ["", "## (d) Locust against wrk (full model, REST, direct)\n",
                  *load_rows("tool", {"wrk": wrk_run, "Locust (FastHttpUser, 1 process)": locust_run}),
                  f"\nLocust ÷ wrk: {locust_run['requests_per_s'] / wrk_run['requests_per_s']:.2f}."]
    if "tuning" in results:
        lines += ["", "## Tuning the full model (workers × threads, batch size, max batch delay)\n",
                  "| workers | threads | batch | delay ms | req/s | p50 ms | p99 ms | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['workers']} | {r['threads']} | {r['batch']} | {r['delay_ms']} | {r['requests_per_s']:.0f} "
                  f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |" for r in results["tuning"]]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["router", "stock", "crosscheck", "tuning"])
    parser.add_argument("--run-dir", type=Path, default=server.DEFAULT_RUN_DIR)
    parser.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--image", type=Path, default=REPO / "runs" / "examples" / "sneaker.png")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "bench.md")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    instance = server.Instance.load(args.run_dir.resolve())
    if server.running_pid(instance) is None:
        log.error("no TorchServe running from %s: run `make serve` first", args.run_dir)
        return 1
    # The machine's cores: served throughput is per machine, and loadtest.capacity turns it into per core.
    results: dict[str, Any] = {"served": {}, "in_process": {}, "cores": multiprocessing.cpu_count()}
    bodies = [item.png for item in test_items(64)]
    for variant in VARIANTS:
        rest_load(instance, model_name(variant), args.image, WARM_UP_S)  # measure warm workers
        results["served"][variant] = median_load([rest_load(instance, model_name(variant), args.image, args.duration_s)
                                                  for _ in range(args.rounds)])
        images_per_s, shape = in_process_throughput(variant, args.checkpoints, args.duration_s, bodies)
        results["in_process"][variant] = {"images_per_s": images_per_s, **shape}
        log.info("%s: served %s, in-process %.0f img/s", variant, results["served"][variant], images_per_s)
    if "router" not in args.skip:
        from loadtest import router_overhead

        overhead_args = router_overhead.get_args_parser().parse_args(
            ["--connections", "1", str(CONNECTIONS), "--rounds", str(args.rounds), "--duration-s",
             str(args.duration_s), "--run-dir", str(args.run_dir)])
        measured = router_overhead.measure(overhead_args)
        results["router"] = overhead_table(*measured)
        results["router_cpu_us"] = router_overhead.cpu_per_request(measured[0])  # loadtest.capacity sizes with it
    if "stock" not in args.skip:
        results["handlers"] = handler_comparison(args.checkpoints, args.image, args.duration_s, args.rounds)
        log.info("handlers: %s", results["handlers"])
    if "crosscheck" not in args.skip:
        results["crosscheck"] = locust_vs_wrk(instance, args.image, args.duration_s, args.output.parent)
        log.info("crosscheck: %s", results["crosscheck"])
    if "tuning" not in args.skip:
        results["tuning"] = tuning_sweep(args.checkpoints, args.image, args.duration_s)
    command = "python -m loadtest.bench " + " ".join(sys.argv[1:])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = markdown(results, command.strip())
    args.output.write_text(report)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
