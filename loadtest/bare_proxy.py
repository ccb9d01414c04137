"""What the router's own work costs beyond a bare Python hop: a minimal aiohttp pass-through proxy (no routing,
metrics, logging, retries or token checks: one ClientSession forwarding the body with TorchServe's key, on
uvloop like the router) against the router with the arm that serves the same model pinned, and TorchServe
directly for reference. REST load from wrk at `--connections`, `--rounds` rounds alternating the three paths so
drifts of the machine hit them alike; the table gives each path's median round, and the CPU time (user +
system) the proxy and the router each spent per request: the router's minus the proxy's is what routing,
metrics, the token check and the durable request log cost; the proxy's is the floor of any aiohttp hop.

Usage:
    make serve
    .venv/bin/python -m loadtest.bare_proxy [--duration-s 8] [--rounds 3] [--connections 32] [--variant full]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from loadtest.router_overhead import CpuMeter, wrk
from loadtest.workload import REPO, endpoint, publish, test_items
from serving.instance import free_ports

log = logging.getLogger("loadtest.bare_proxy")
TOKEN_ENV = "BARE_PROXY_UPSTREAM_TOKEN"  # the proxy's upstream key, passed in the environment, never as an argument


def proxy_app(upstream: str, token: str) -> web.Application:
    app = web.Application(client_max_size=8 * 2**20)
    authorization = f"Bearer {token}"

    async def open_session(app: web.Application) -> None:
        app["session"] = ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=30))

    async def close_session(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {"Authorization": authorization, "Content-Type": request.content_type}
        async with app["session"].post(upstream + request.path, data=body, headers=headers) as answer:
            return web.Response(body=await answer.read(), status=answer.status, content_type=answer.content_type)

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_post("/predictions/{path:.*}", forward)
    return app


def serve(port: int, upstream: str) -> None:
    import uvloop

    web.run_app(proxy_app(upstream, os.environ[TOKEN_ENV]), host="127.0.0.1", port=port, access_log=None,
                print=None, loop=uvloop.new_event_loop())


def start_proxy(upstream: str, token: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_ports(1)[0]
    process = subprocess.Popen([sys.executable, "-m", "loadtest.bare_proxy", "serve", "--port", str(port),
                                "--upstream", upstream], cwd=REPO, env={**os.environ, TOKEN_ENV: token})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/", timeout=1)  # any answer (404) means it listens
            return process, url
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the bare proxy did not start within 30 s")


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    direct = endpoint("direct", args.variant, args.run_dir)
    routed = endpoint("router", args.variant, args.run_dir, args.router_config, args.experiment)
    from router import process
    from router.config import load_config

    config = load_config(args.router_config)
    arm = next(a for a in config.experiments[args.experiment].arms if a.name == routed.arm)
    # The proxy and TorchServe get the very path the router's pinned arm calls: the same model and version.
    path = f"/predictions/{arm.target.model}" + (f"/{arm.target.version}" if arm.target.version else "")
    proxy, proxy_url = start_proxy(direct.rest_url, direct.token)
    paths = {"TorchServe direct": (direct.rest_url + path, direct.headers("image/png")),
             "bare aiohttp proxy": (proxy_url + path, {"Content-Type": "image/png"}),
             "router (pinned arm)": (routed.rest_url + routed.rest_path(), routed.headers("image/png"))}
    pids = {"bare aiohttp proxy": proxy.pid, "router (pinned arm)": process.running_pid(config)}
    rounds: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    try:
        with tempfile.TemporaryDirectory() as folder:
            body = Path(folder) / "body.png"
            body.write_bytes(test_items(1)[0].png)
            for url, headers in paths.values():  # warm-up: connections, JIT, first batches
                wrk(url, headers, body, args.connections, 2)
            for index in range(args.rounds):
                for name, (url, headers) in paths.items():
                    meter = CpuMeter(pids.get(name))
                    rounds[name].append(wrk(url, headers, body, args.connections, args.duration_s))
                    used = meter.per_request_us(round(rounds[name][-1][0] * args.duration_s))
                    if used is not None:
                        cpu[name].append(used)
                    log.info("round %d %-20s %.0f req/s, p50 %.2f ms, p99 %.1f ms, errors %d", index, name,
                             *rounds[name][-1])
    finally:
        proxy.terminate()  # the proxy this run started, by its handle
        proxy.wait(timeout=10)
    table = {}
    for name, results in rounds.items():
        rate = statistics.median(r[0] for r in results)
        median_round = min(results, key=lambda r: abs(r[0] - rate))
        table[name] = {"requests_per_s": rate, "p50_ms": median_round[1], "p99_ms": median_round[2],
                       "errors": sum(r[3] for r in results),
                       "cpu_us": statistics.median(cpu[name]) if cpu[name] else float("nan")}
    return table


def markdown(table: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [f"wrk at {args.connections} connections, {args.rounds} alternating rounds of {args.duration_s:g} s, "
             f"the median round; model `{args.variant}`:", "",
             "| path | req/s | p50 ms | p99 ms | CPU µs/request (proxy or router process) | errors |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {row['requests_per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.1f} | "
              f"{'–' if row['cpu_us'] != row['cpu_us'] else format(row['cpu_us'], '.0f')} | {row['errors']:.0f} |"
              for name, row in table.items()]
    bare, router = table["bare aiohttp proxy"]["requests_per_s"], table["router (pinned arm)"]["requests_per_s"]
    lines += ["", f"Router ÷ bare proxy: {router / bare:.2f} (the router's own work); bare proxy ÷ direct: "
              f"{bare / table['TorchServe direct']['requests_per_s']:.2f} (the Python hop itself)."]
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    proxy = commands.add_parser("serve", help="run the bare proxy (started by the measurement itself)")
    proxy.add_argument("--port", type=int, required=True)
    proxy.add_argument("--upstream", required=True)
    parser.add_argument("--variant", default="full")
    parser.add_argument("--experiment", default="fashion")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "torchserve")
    parser.add_argument("--router-config", type=Path, default=REPO / "router" / "experiments.yaml")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this Markdown file")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "serve":
        serve(args.port, args.upstream)
        return 0
    table = markdown(measure(args), args)
    publish(table, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
