"""The run lease: one run of a run name at a time on a storage root.

A flow run (the whole engine, or a stage run on its own) holds ``leases/run-<run_name>`` in the
store (:class:`storage.lease.Lease`) while it works. A second run of the same name, such as a
scheduled run that fires while the previous one still waits for annotators, waits up to
``config.lease.wait_s`` and then stops with :class:`~storage.errors.LeaseHeldError`, having
written nothing. Rounds check the lease before they start and before they commit, so a run that
hung past ``ttl_s`` and lost its lease to another stops instead of committing the same round.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from flows.config import EngineConfig
from storage.lease import Lease

__all__ = ["check_run_lease", "run_lease", "run_lease_name"]

# The lease of the flow run in progress in this context; stage subflows of the parent flow see
# it and neither take it again nor wait for themselves.
_CURRENT: ContextVar[Lease | None] = ContextVar("data_engine_run_lease", default=None)


def run_lease_name(config: EngineConfig) -> str:
    """The lease's name for ``config.run_name``."""
    return f"run-{config.run_name}"


@contextmanager
def run_lease(config: EngineConfig) -> Iterator[Lease]:
    """Hold the run's lease for the ``with`` block (re-entrant within one flow run).

    Raises :class:`~storage.errors.LeaseHeldError` when another live run holds it for longer
    than ``config.lease.wait_s``.
    """
    from prefect import get_run_logger

    from flows.tasks import store_for

    location = store_for(config).location
    current = _CURRENT.get()
    name = run_lease_name(config)
    if current is not None and (current.name, current.location.root) == (name, location.root):
        yield current
        return
    lease = Lease(
        location,
        name,
        ttl_s=config.lease.ttl_s,
        wait_s=config.lease.wait_s,
        poll_s=config.lease.poll_s,
    )
    waited = lease.acquire()
    if waited >= config.lease.poll_s:
        get_run_logger().info("waited %.1f s for run %r's lease", waited, config.run_name)
    token = _CURRENT.set(lease)
    try:
        yield lease
    finally:
        _CURRENT.reset(token)
        lease.release()


def check_run_lease() -> None:
    """Raise :class:`~storage.errors.LeaseLostError` if this run's lease was taken over."""
    lease = _CURRENT.get()
    if lease is not None:
        lease.check()
