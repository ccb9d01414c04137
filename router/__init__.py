"""A/B router in front of TorchServe: weighted and sticky assignment, overrides, shadow traffic, circuit
breakers, per-arm Prometheus metrics, feedback-based online accuracy and guardrail rollback.

Run it with `python -m router --config router/experiments.yaml` (see docs/router.md).
"""
