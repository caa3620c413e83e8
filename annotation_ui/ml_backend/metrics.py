"""Counters and latencies the ML backend reports on ``GET /metrics``.

Latencies are kept per route in a bounded window (the last ``window`` requests), which is enough
for the median and 95th percentile an operator looks at; nothing here grows without bound.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import numpy as np

__all__ = ["Metrics"]


class Metrics:
    """Thread-safe request counts, latencies (milliseconds) and webhook events."""

    def __init__(self, *, window: int = 1000) -> None:
        self._lock = threading.Lock()
        self._latency_ms: dict[str, deque[float]] = {}
        self._window = window
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.retrain_requests = 0
        self.retrain_failures = 0

    def observe(self, route: str, seconds: float, *, error: bool = False) -> None:
        """Record one request to ``route`` that took ``seconds``."""
        with self._lock:
            self.requests[route] += 1
            if error:
                self.errors[route] += 1
            window = self._latency_ms.setdefault(route, deque(maxlen=self._window))
            window.append(seconds * 1000.0)

    def event(self, action: str) -> None:
        """Record one webhook event (Label Studio's ``action``)."""
        with self._lock:
            self.events[action] += 1

    def snapshot(self) -> dict[str, Any]:
        """Everything as JSON-ready values; latencies as count/median/p95/max in ms."""
        with self._lock:
            latency = {
                route: {
                    "count": len(values),
                    "median_ms": float(np.median(values)),
                    "p95_ms": float(np.percentile(values, 95)),
                    "max_ms": float(max(values)),
                }
                for route, values in self._latency_ms.items()
                if values
            }
            return {
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "latency": latency,
                "webhook_events": dict(self.events),
                "retrain_requests": self.retrain_requests,
                "retrain_failures": self.retrain_failures,
            }
