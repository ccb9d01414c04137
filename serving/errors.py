"""The serving stage's own failure: a TorchServe instance could not be set up, started, reached or stopped."""

from __future__ import annotations


class ServeError(RuntimeError):
    """TorchServe could not be started, reached or stopped; the message says why and where to look."""
