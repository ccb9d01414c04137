"""`make bench`: the kit's performance claims, each a ratio measured in one run on this machine.

(a) every variant × runtime `make serve` serves (serving/models.yaml: PyTorch and ONNX Runtime forms): served
    throughput (wrk, REST PNG, against `make serve`'s TorchServe) and its serving efficiency, ÷ its in-process
    throughput at the served settings (the handler's own decoding + forward, loaded as the handler loads it: one
    process per worker with the worker's threads and memory format, all running at once); then the choice per
    variant: its fastest served form whose test accuracy is within ACCURACY_TOLERANCE of its PyTorch form's;
(b) router ÷ direct throughput, the router's added p50 and p99 (closed loop, and REST at a fixed 200 req/s)
    and its CPU per request, REST and gRPC, against its hot-path targets (loadtest.router_overhead);
(c) the chosen full form ÷ TorchServe's stock image classifier
    (`ts.torch_handler.image_classifier.ImageClassifier`, given this model's transforms, the eager full model) on
    the same settings, each in its own fresh TorchServe, measured in alternating rounds;
(d) Locust's REST numbers against wrk's on the same target;
plus each chosen form's tuning sweep (workers × threads, batch size, batch delay) and the targets: the full model
served ≥ 1.3× the stock handler with a p99 no higher, serving efficiency ≥ 0.8, int8 ≥ 3× and distilled ≥ 2× the
full model served.

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
from serving.archive import MODEL_CONFIGS, build_archive, model_name
from serving.client import prediction_path
from serving.models_file import read_models
from serving.project import ONNX_SUFFIX

log = logging.getLogger("loadtest.bench")

CONNECTIONS = 32
WARM_UP_S = 3.0
# A faster form replaces a variant's PyTorch form only if it answers as well: test accuracy within 0.1 pt.
ACCURACY_TOLERANCE = 0.001
EXPERIMENTS = REPO / "router" / "experiments.yaml"
SERVED_EXPERIMENT = "fashion"  # the experiment whose arms serve the chosen form of each variant
TARGETS = {"stock": 1.3, "efficiency": 0.8, "int8": 3.0, "distilled": 2.0}
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
@dataclass(frozen=True)
class Form:
    """One served model: a trained variant (`base`) in one runtime."""

    model: str
    variant: str  # full, full-onnx, ...

    @property
    def base(self) -> str:
        return self.variant.removesuffix(ONNX_SUFFIX)

    @property
    def runtime(self) -> str:
        return "ONNX Runtime" if self.variant.endswith(ONNX_SUFFIX) else "PyTorch"


def served_forms(instance: server.Instance) -> list[Form]:
    return [Form(entry.name, entry.variant) for entry in read_models(instance.models_file)]


def model_settings(variant: str, configs: Path = MODEL_CONFIGS) -> dict[str, Any]:
    """The served settings of `variant`: `configs` is the served instance's model configs (make serve's are
    handlers/model_configs/)."""
    settings: dict[str, Any] = yaml.safe_load((configs / f"{variant}.yaml").read_text())
    return settings


def _in_process_worker(args: tuple[str, str, int, int, str, float, list[bytes]]) -> int:
    weights, model_format, batch_size, threads, memory_format, duration_s, bodies = args
    import torch

    sys.path.insert(0, str(REPO / "handlers"))
    from request_decoding import image_to_pixels

    import fashion_cnn

    torch.set_num_threads(threads)  # as the handler does: torch's threads, and the ONNX session's below
    model = fashion_cnn.load_model(weights, model_format, threads, memory_format)
    images = 0
    deadline = time.perf_counter() + duration_s
    with torch.inference_mode():
        while time.perf_counter() < deadline:
            batch = torch.stack([image_to_pixels(bodies[(images + i) % len(bodies)]).float()
                                 for i in range(batch_size)])
            model(fashion_cnn.normalize(batch))
            images += batch_size
    return images


def in_process_throughput(variant: str, checkpoints: Path, duration_s: float, bodies: list[bytes],
                          configs: Path = MODEL_CONFIGS) -> tuple[float, dict[str, Any]]:
    """Images/s of `workers` processes × `threads` threads, decoding PNGs and running batches of `batchSize`,
    each loading the model as the handler does (format from the card, threads and memory format from the model
    config)."""
    settings = model_settings(variant, configs)
    handler = settings.get("handler", {})
    workers, threads = settings["minWorkers"], int(handler.get("threads", 1))
    card = json.loads((checkpoints / f"{variant}.card.json").read_text())
    job = (str(checkpoints / card["file"]), card["format"], settings["batchSize"], threads,
           str(handler.get("memory_format", "contiguous")), duration_s, bodies)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_in_process_worker, [(*job[:5], 1.0, bodies)] * workers)  # warm-up: imports, first batches
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


def handler_comparison(ours_variant: str, checkpoints: Path, image: Path, duration_s: float, rounds: int,
                       configs: Path = MODEL_CONFIGS) -> dict[str, Any]:
    """`ours_variant` (the chosen full form) against the stock handler on the eager full model, both with
    `ours_variant`'s TorchServe settings (workers, batch size, delay)."""
    ours_settings = model_settings(ours_variant, configs)
    settings = {key: value for key, value in ours_settings.items() if key != "handler"}
    results: dict[str, list[Load]] = {"ours": [], "stock": []}
    ours_model = model_name(ours_variant)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        ours_mar = build_archive(ours_variant, "1.0", checkpoints, root / "ours-mar",  # its threads, memory format
                                 model_config=configs / f"{ours_variant}.yaml")
        stock_mar = stock_archive(checkpoints, root)
        # Both get ours' threads per worker: ours through its model config, the stock handler (which sets none)
        # through OMP_NUM_THREADS — one thread per worker is the stock configuration's best measured setting (FACTS).
        threads = str(ours_settings.get("handler", {}).get("threads", 1))
        ours = start_instance(root / "ours", ours_model, ours_mar, settings, {})
        stock = start_instance(root / "stock", "fashion-stock", stock_mar, settings, {"OMP_NUM_THREADS": threads})
        try:
            for _ in range(rounds):
                results["ours"].append(rest_load(ours, ours_model, image, duration_s))
                results["stock"].append(rest_load(stock, "fashion-stock", image, duration_s))
        finally:
            server.stop(ours)
            server.stop(stock)
    return {"variant": ours_variant, "settings": settings,
            "threads": int(ours_settings.get("handler", {}).get("threads", 1)),
            **{name: median_load(loads) for name, loads in results.items()}}


def median_load(loads: list[Load]) -> dict[str, float]:
    import statistics

    return {"requests_per_s": statistics.median(load.requests_per_s for load in loads),
            "p50_ms": statistics.median(load.p50_ms for load in loads),
            "p99_ms": statistics.median(load.p99_ms for load in loads),
            "errors": sum(load.errors for load in loads)}


TUNING = [  # (workers, threads per worker, batch size, max batch delay ms)
    (2, 1, 8, 5), (2, 1, 16, 5), (2, 1, 32, 5), (2, 1, 64, 5), (2, 1, 16, 10), (1, 2, 16, 5),
]


def tuning_sweep(variant: str, checkpoints: Path, image: Path, duration_s: float,
                 configs: Path = MODEL_CONFIGS) -> list[dict[str, Any]]:
    """`variant` in a fresh TorchServe per setting (fresh instances run slower than a long-warm one, so compare
    these rows with each other, not with (a)); its memory format as its model config says."""
    rows = []
    handler = model_settings(variant, configs).get("handler", {})
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for index, (workers, threads, batch, delay) in enumerate(TUNING):
            settings = {"minWorkers": workers, "maxWorkers": workers, "batchSize": batch, "maxBatchDelay": delay,
                        "responseTimeout": 30, "handler": {**handler, "threads": threads}}
            config = root / f"t{index}.yaml"
            config.write_text(yaml.safe_dump(settings))  # threads reach the handler through the archive's config
            mar = build_archive(variant, "1.0", checkpoints, root / f"mar{index}", model_config=config)
            instance = start_instance(root / f"t{index}", model_name(variant), mar, settings, {})
            try:
                load = rest_load(instance, model_name(variant), image, duration_s)
            finally:
                server.stop(instance)
            rows.append({"variant": variant, "workers": workers, "threads": threads, "batch": batch,
                         "delay_ms": delay, **load.__dict__})
            log.info("tuning %s", rows[-1])
    return rows


# --- the choice per variant, and the targets --------------------------------------------------------------------
def choose_forms(forms: list[Form], served: dict[str, dict[str, float]], checkpoints: Path) -> dict[str, Any]:
    """{variant: the chosen form and why}: the fastest served form of each trained variant whose test accuracy
    is within ACCURACY_TOLERANCE of the variant's PyTorch form (int8-onnx against the FX int8)."""
    def accuracy_of(variant: str) -> float:
        value: float = json.loads((checkpoints / f"{variant}.card.json").read_text())["test_accuracy"]
        return value

    accuracy = {form.variant: accuracy_of(form.variant) for form in forms}
    choices: dict[str, Any] = {}
    for base in dict.fromkeys(form.base for form in forms):
        candidates = [form for form in forms if form.base == base]
        reference = accuracy_of(base)  # the PyTorch form's card, whether or not it is among the measured forms
        qualified = [form for form in candidates if accuracy[form.variant] >= reference - ACCURACY_TOLERANCE]
        best = max(qualified, key=lambda form: served[form.variant]["requests_per_s"])
        others = [f"{form.variant} {served[form.variant]['requests_per_s']:.0f} req/s, "
                  f"{accuracy[form.variant] * 100:.2f} %" for form in candidates if form != best]
        choices[base] = {"variant": best.variant, "model": best.model, "runtime": best.runtime,
                         "requests_per_s": served[best.variant]["requests_per_s"],
                         "accuracy": accuracy[best.variant], "against": "; ".join(others) or "no other form"}
    return choices


def experiment_mismatches(choices: dict[str, Any], experiments: Path = EXPERIMENTS) -> list[str]:
    """Arms of the served experiment that do not use their variant's chosen form."""
    arms = yaml.safe_load(experiments.read_text())["experiments"][SERVED_EXPERIMENT]["arms"]
    return [f"arm `{arm}` serves `{spec['model']}`, the bench chose `{choices[arm]['model']}`"
            for arm, spec in arms.items() if arm in choices and spec["model"] != choices[arm]["model"]]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target's measured ratio against its bound, from this run's figures."""
    choices, served, in_process = results["choices"], results["served"], results["in_process"]
    full = choices["full"]["variant"]
    rows = [{"target": f"full model served ({full}) ÷ in-process: serving efficiency",
             "value": served[full]["requests_per_s"] / in_process[full]["images_per_s"],
             "bound": TARGETS["efficiency"]}]
    for base in ("int8", "distilled"):
        if base in choices:
            rows.append({"target": f"{base} served ({choices[base]['variant']}) ÷ full served ({full})",
                         "value": choices[base]["requests_per_s"] / choices["full"]["requests_per_s"],
                         "bound": TARGETS[base]})
    if "handlers" in results:
        ours, stock = results["handlers"]["ours"], results["handlers"]["stock"]
        rows.append({"target": f"full served ({results['handlers']['variant']}) ÷ stock `ImageClassifier`, same "
                               "settings", "value": ours["requests_per_s"] / stock["requests_per_s"],
                     "bound": TARGETS["stock"]})
        rows.append({"target": "… with a p99 no higher: stock p99 ÷ ours", "value": stock["p99_ms"] / ours["p99_ms"],
                     "bound": 1.0})
    return [{**row, "met": row["value"] >= row["bound"]} for row in rows]


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
    choices = results["choices"]
    full = results["served"][choices["full"]["variant"]]["requests_per_s"]
    lines = [f"# Benchmark\n\n`{command}` on this machine ({results['cores']} cores, torch's CPU capability "
             f"{results['cpu_capability']}), torch "
             f"{importlib.metadata.version('torch')}, ONNX Runtime {importlib.metadata.version('onnxruntime')}, "
             f"TorchServe {importlib.metadata.version('torchserve')}; REST load from wrk at {CONNECTIONS} "
             "connections, 28×28 PNG bodies.\n",
             f"Checkpoints from `{results['checkpoints']['directory']}`: the full model's card says "
             f"{results['checkpoints']['full_accuracy'] * 100:.2f} % test accuracy after "
             f"{results['checkpoints']['epochs']} epochs{' (a dry run)' if results['checkpoints']['dry_run'] else ''}."
             " Throughput does not depend on the weights; the accuracies below do.\n",
             "## (a) Every variant × runtime, served and in-process\n",
             "| model | runtime | served req/s | p50 ms | p99 ms | in-process img/s (workers × threads, batch) "
             "| efficiency | vs full |", "|---|---|---|---|---|---|---|---|"]
    for variant, served in results["served"].items():
        inproc = results["in_process"][variant]
        lines.append(f"| {model_name(variant)} | {inproc['runtime']} | {served['requests_per_s']:.0f} | "
                     f"{served['p50_ms']:.1f} | {served['p99_ms']:.1f} | {inproc['images_per_s']:.0f} "
                     f"({inproc['workers']} × {inproc['threads']}, {inproc['batch']}) | "
                     f"{served['requests_per_s'] / inproc['images_per_s']:.2f} | "
                     f"{served['requests_per_s'] / full:.2f}× |")
    lines += ["", f"\"vs full\": ÷ the chosen full form. The choice per variant: its fastest served form whose test "
              f"accuracy is within {ACCURACY_TOLERANCE * 100:g} pt of its PyTorch form's (from the cards; int8-onnx "
              "against the FX int8):\n",
              "| variant | chosen | runtime | req/s | test accuracy | the other form |", "|---|---|---|---|---|---|",
              *(f"| {base} | `{choice['model']}` | {choice['runtime']} | {choice['requests_per_s']:.0f} | "
                f"{choice['accuracy'] * 100:.2f} % | {choice['against']} |" for base, choice in choices.items())]
    mismatches = results.get("mismatches", [])
    lines.append(f"\n`router/experiments.yaml`'s `{SERVED_EXPERIMENT}` experiment: "
                 + ("; ".join(mismatches) + "." if mismatches else "every arm serves its variant's chosen form."))
    if "router" in results:
        lines += ["", "## (b) Router against direct (same model, pinned arm)\n", results["router"]]
    if "handlers" in results:
        ours, stock = results["handlers"]["ours"], results["handlers"]["stock"]
        settings = results["handlers"]["settings"]
        lines += ["", f"## (c) Our handler ({results['handlers']['variant']}) against TorchServe's stock image "
                  "classifier (eager full model), same settings\n",
                  f"Both: {settings['minWorkers']} workers of {results['handlers']['threads']} thread(s) "
                  f"(the stock handler's through OMP_NUM_THREADS), batch {settings['batchSize']}, "
                  f"{settings['maxBatchDelay']} ms delay, each in a fresh TorchServe, alternating rounds.\n",
                  *load_rows("handler", {"ours": ours, "stock `ImageClassifier`": stock}),
                  f"\nOurs ÷ stock: {ours['requests_per_s'] / stock['requests_per_s']:.2f}× throughput, p99 "
                  f"{ours['p99_ms']:.1f} vs {stock['p99_ms']:.1f} ms."]
    if "crosscheck" in results:
        wrk_run, locust_run = results["crosscheck"]["wrk"], results["crosscheck"]["locust"]
        lines += ["", "## (d) Locust against wrk (fashion-full, REST, direct)\n",
                  *load_rows("tool", {"wrk": wrk_run, "Locust (FastHttpUser, 1 process)": locust_run}),
                  f"\nLocust ÷ wrk: {locust_run['requests_per_s'] / wrk_run['requests_per_s']:.2f}."]
    if "tuning" in results:
        lines += ["", "## Tuning each chosen form (workers × threads, batch size, max batch delay)\n",
                  "A fresh TorchServe per row: compare rows of one form with each other, not with (a). **Bold**: "
                  "the form's most requests per second.\n",
                  "| form | workers | threads | batch | delay ms | req/s | p50 ms | p99 ms | errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        best: dict[str, dict[str, Any]] = {}
        for row in results["tuning"]:
            if row["requests_per_s"] > best.get(row["variant"], {}).get("requests_per_s", -1.0):
                best[row["variant"]] = row
        for r in results["tuning"]:
            mark = "**" if r is best[r["variant"]] else ""
            lines.append(f"| {r['variant']} | {r['workers']} | {r['threads']} | {r['batch']} | {r['delay_ms']} | "
                         f"{mark}{r['requests_per_s']:.0f}{mark} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['errors']} |")
    lines += ["", "## Targets\n", "| target | measured | bound | |", "|---|---|---|---|",
              *(f"| {row['target']} | {row['value']:.2f} | ≥ {row['bound']:g} | {'met' if row['met'] else 'missed'} |"
                for row in results["targets"])]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["router", "stock", "crosscheck", "tuning"])
    parser.add_argument("--models", nargs="*", default=[], help="only these served models (default: every one)")
    parser.add_argument("--run-dir", type=Path, default=server.DEFAULT_RUN_DIR)
    parser.add_argument("--checkpoints", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--image", type=Path, default=REPO / "runs" / "examples" / "sneaker.png")
    parser.add_argument("--output", type=Path, default=REPO / "reports" / "bench.md")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    instance = server.running_instance(args.run_dir)
    # The machine's cores: served throughput is per machine, and loadtest.capacity turns it into per core.
    import torch

    results: dict[str, Any] = {"served": {}, "in_process": {}, "cores": multiprocessing.cpu_count(),
                               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    bodies = [item.png for item in test_items(64)]
    forms = [form for form in served_forms(instance) if not args.models or form.model in args.models]
    if not any(form.base == "full" for form in forms):
        log.error("--models must include a form of the full model: every ratio is against it")
        return 2
    full_card = json.loads((args.checkpoints / "full.card.json").read_text())
    results["checkpoints"] = {"directory": str(args.checkpoints), "full_accuracy": full_card["test_accuracy"],
                              "epochs": full_card["recipe"]["epochs"], "dry_run": full_card["recipe"]["dry_run"]}
    for form in forms:
        rest_load(instance, form.model, args.image, WARM_UP_S)  # measure warm workers
        results["served"][form.variant] = median_load([rest_load(instance, form.model, args.image, args.duration_s)
                                                       for _ in range(args.rounds)])
        images_per_s, shape = in_process_throughput(form.variant, args.checkpoints, args.duration_s, bodies,
                                                    instance.model_configs)
        results["in_process"][form.variant] = {"images_per_s": images_per_s, "runtime": form.runtime, **shape}
        log.info("%s: served %s, in-process %.0f img/s", form.model, results["served"][form.variant], images_per_s)
    results["choices"] = choose_forms(forms, results["served"], args.checkpoints)
    results["mismatches"] = experiment_mismatches(results["choices"])
    if "router" not in args.skip:
        from loadtest import router_overhead

        overhead_args = router_overhead.get_args_parser().parse_args(
            ["--connections", "1", str(CONNECTIONS), "--rounds", str(args.rounds), "--duration-s",
             str(args.duration_s), "--run-dir", str(args.run_dir)])
        measured = router_overhead.measure(overhead_args)
        results["router"] = overhead_table(*measured)
        results["router_cpu_us"] = router_overhead.cpu_per_request(measured[0])  # loadtest.capacity sizes with it
    if "stock" not in args.skip:
        results["handlers"] = handler_comparison(results["choices"]["full"]["variant"], args.checkpoints, args.image,
                                                 args.duration_s, args.rounds, instance.model_configs)
        log.info("handlers: %s", results["handlers"])
    if "crosscheck" not in args.skip:
        results["crosscheck"] = locust_vs_wrk(instance, args.image, args.duration_s, args.output.parent)
        log.info("crosscheck: %s", results["crosscheck"])
    if "tuning" not in args.skip:
        results["tuning"] = [row for choice in results["choices"].values()
                             for row in tuning_sweep(choice["variant"], args.checkpoints, args.image, args.duration_s,
                                                     instance.model_configs)]
    results["targets"] = targets(results)
    command = "python -m loadtest.bench " + " ".join(sys.argv[1:])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = markdown(results, command.strip())
    args.output.write_text(report)
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
