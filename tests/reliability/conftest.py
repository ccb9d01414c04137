"""The reliability report: each test adds what it tried and what happened; at the end of the session the sections
are written, in a fixed order, to the file named by CHAOS_REPORT (`make chaos`: reports/reliability.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ORDER = ["Bad-input matrix", "Faults under load", "Soak", "Security"]


class ChaosReport:
    def __init__(self) -> None:
        self.sections: dict[str, list[str]] = {title: [] for title in ORDER}

    def add(self, section: str, text: str) -> None:
        self.sections[section].append(text.rstrip())

    def markdown(self) -> str:
        parts = ["# Reliability and security", "",
                 "Written by `make chaos` (tests/reliability/): what was tried against the real TorchServe and "
                 "router, and what happened."]
        for title, texts in self.sections.items():
            if texts:
                parts += ["", f"## {title}", "", "\n\n".join(texts)]
        return "\n".join(parts) + "\n"


@pytest.fixture(scope="session")
def chaos_report() -> Iterator[ChaosReport]:
    report = ChaosReport()
    yield report
    path = os.environ.get("CHAOS_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(report.markdown())
