"""Replay labelled Fashion-MNIST test images through the router as distinct users and report each true label
as feedback, then print the experiment's verdict: online accuracy per arm, with intervals and a test against
control. It shows what the feedback loop gives once real labels arrive (from users, reviewers, returns...).

Usage:
    make serve
    .venv/bin/python -m loadtest.feedback_replay [--experiment fashion] [--images 2000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from loadtest.workload import test_items
from router.config import load_config
from router.process import base_url
from router.report import to_markdown
from router.tokens import load_tokens
from serving.project import REPO

log = logging.getLogger("loadtest.feedback_replay")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router-config", type=Path, default=REPO / "router" / "experiments.yaml")
    parser.add_argument("--experiment", default="fashion")
    parser.add_argument("--images", type=int, default=2000, help="the first N test images")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.router_config)
    tokens = load_tokens(config.tokens_file)
    base = base_url(config)
    items = test_items(args.images, args.data_dir)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=args.concurrency))
    headers = {"Authorization": f"Bearer {tokens.client}", "Content-Type": "image/png"}

    def one(index: int) -> int:
        response = session.post(f"{base}/predictions/{args.experiment}", data=items[index].png,
                                headers={**headers, config.sticky_header: f"replay-user-{index}"}, timeout=30)
        if response.status_code != 200:
            return response.status_code
        feedback = session.post(f"{base}/feedback", timeout=30, headers={"Authorization": f"Bearer {tokens.client}"},
                                json={"request_id": response.headers["X-Request-Id"], "label": items[index].label})
        return feedback.status_code

    with ThreadPoolExecutor(args.concurrency) as pool:
        statuses = list(pool.map(one, range(len(items))))
    failed = sum(status != 200 for status in statuses)
    log.info("%d requests with feedback, %d failed", len(statuses) - failed, failed)
    report = session.get(f"{base}/admin/report/{args.experiment}", headers={"Authorization": f"Bearer {tokens.admin}"},
                         timeout=30)
    report.raise_for_status()
    print(to_markdown(report.json()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
