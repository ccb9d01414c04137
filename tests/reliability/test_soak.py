"""The soak's short form (`loadtest/soak.py`): the test stack's saturation through the router measured, then 20 s
at 70 % of it with the experiment's weights choosing the arms. No failure, no wrong answer, the rate held, and
the memory of TorchServe's frontend, its workers and the router flat. `make chaos` then soaks `make serve`'s
stack for minutes with the same code."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.soak import soak
from tests.reliability.conftest import ChaosReport
from tests.test_router import Stack, stack  # noqa: F401 (the real router in front of the test TorchServe)

pytestmark = pytest.mark.router


def test_soak_at_70_percent_of_saturation_keeps_memory_flat(stack: Stack, chaos_report: ChaosReport,  # noqa: F811
                                                            tmp_path: Path) -> None:
    result = soak(stack.torchserve.run_dir, stack.config_path, tmp_path, duration_s=20, load=0.7, step_s=4)
    chaos_report.add("Soak", result.markdown("The test stack (1 worker per model, batch ≤ 4), short form"))
    assert result.outcome.summary["Aggregated"]["requests"] > 1000
    assert all(series for series in result.memory_mb.values())  # the sampler saw every process
    assert not result.problems, result.problems  # failures, rate not held, generator saturated, memory growth
