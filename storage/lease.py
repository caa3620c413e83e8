"""Leases: at most one holder at a time for a named piece of work, across processes and machines,
on a local folder or S3.

The engine takes one per run (``flows``): a scheduled run that fires while the previous run of the
same name is still working sees the lease held and waits or stops, instead of doing the same
rounds a second time.

How it works: a lease is a chain of *generation* objects ``leases/<name>/<generation>.json``
(12 digits), each created exclusively (``os.link`` locally, ``If-None-Match: *`` on S3), like the
mask store's commit log. The newest generation says who holds the lease and until when::

    {"schema_version": 1, "name": "run-engine", "generation": 7,
     "owner": {"host": "worker-1", "pid": 4242, "pid_ns": 4026531836, "token": "5f0c..."},
     "acquired_at": "...", "expires_at": "...", "released": false}

- **acquire**: read the newest generation; if there is none, or it is released, expired, or held
  by a process of this machine (same host and PID namespace) that no longer exists, create the
  next generation. Of several contenders exactly one creates it; the others look again.
- **renew** (a heartbeat thread, every ``ttl_s / 3``): create the next generation with a later
  expiry. If another process created it first, the lease expired and was taken over (the holder
  stalled for longer than ``ttl_s``): the lease is *lost*, and :meth:`Lease.check` raises
  :class:`~storage.errors.LeaseLostError` so the holder stops before it writes more.
- **release**: create the next generation marked released.

After each step the older generations are deleted; the newest stays, so numbers never repeat.
Expiry times are the holder's UTC wall clock, compared with the reader's: keep ``ttl_s`` well
above the clock skew between machines. This module knows nothing of Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from storage.errors import (
    CommitConflictError,
    ConfigError,
    LeaseHeldError,
    LeaseLostError,
    NotFoundError,
    StorageError,
)
from storage.location import StorageLocation

_log = logging.getLogger(__name__)

__all__ = ["LEASE_PREFIX", "LEASE_SCHEMA_VERSION", "Lease", "LeaseOwner", "LeaseState"]

LEASE_PREFIX = "leases"
LEASE_SCHEMA_VERSION = 1
_GENERATION = re.compile(r"^(\d{12})\.json$")
# A reader that lists a generation the holder deleted right after looks again; this many times.
_READ_ATTEMPTS = 10


@dataclass(frozen=True)
class LeaseOwner:
    """Who holds a lease: machine, process (and its PID namespace, when known) and a random
    token that tells apart two leases of one process."""

    host: str
    pid: int
    pid_ns: int | None
    token: str

    @classmethod
    def this_process(cls) -> LeaseOwner:
        """A new owner identity of the calling process."""
        return cls(socket.gethostname(), os.getpid(), _pid_namespace(), uuid.uuid4().hex)

    def is_gone(self) -> bool:
        """True only when the owner is a process of this machine that no longer exists.

        A process of another machine (or container) is never declared gone: its lease ends
        when it expires.
        """
        here = LeaseOwner.this_process()
        # Without /proc (not Linux) both namespaces are None: one host, one process table.
        if self.host != here.host or self.pid_ns != here.pid_ns:
            return False
        if self.pid == here.pid:
            return False  # this very process: alive
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # exists, owned by another user
        return False

    def __str__(self) -> str:
        return f"{self.host} pid {self.pid}"


@dataclass(frozen=True)
class LeaseState:
    """One generation of a lease: its holder, since and until when (UTC), released or not."""

    name: str
    generation: int
    owner: LeaseOwner
    acquired_at: datetime
    expires_at: datetime
    released: bool

    def free_at(self, now: datetime) -> bool:
        """Whether another owner may take the lease at ``now``."""
        return self.released or now >= self.expires_at or self.owner.is_gone()

    def to_json(self) -> dict[str, Any]:
        """The generation object's content."""
        return {
            "schema_version": LEASE_SCHEMA_VERSION,
            "name": self.name,
            "generation": self.generation,
            "owner": {
                "host": self.owner.host,
                "pid": self.owner.pid,
                "pid_ns": self.owner.pid_ns,
                "token": self.owner.token,
            },
            "acquired_at": self.acquired_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "released": self.released,
        }

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> LeaseState:
        """Parse a generation object; raises :class:`StorageError` if it is malformed."""
        try:
            if int(data["schema_version"]) > LEASE_SCHEMA_VERSION:
                raise StorageError(
                    f"{where} has schema_version {data['schema_version']}; this code reads "
                    f"<= {LEASE_SCHEMA_VERSION}"
                )
            owner = data["owner"]
            pid_ns = owner.get("pid_ns")
            return cls(
                name=str(data["name"]),
                generation=int(data["generation"]),
                owner=LeaseOwner(
                    str(owner["host"]),
                    int(owner["pid"]),
                    None if pid_ns is None else int(pid_ns),
                    str(owner["token"]),
                ),
                acquired_at=datetime.fromisoformat(data["acquired_at"]),
                expires_at=datetime.fromisoformat(data["expires_at"]),
                released=bool(data["released"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise StorageError(f"{where} is not a valid lease record: {err!r}") from None


class Lease:
    """A named lease in ``location`` (see the module docstring); a context manager.

    Args:
        location: where the lease lives (a store's ``MaskStore.location``).
        name: the lease's name, a safe key segment such as ``run-engine``.
        ttl_s: seconds a holder keeps the lease without renewing it; the heartbeat renews it
            every ``ttl_s / 3``.
        wait_s: how long :meth:`acquire` waits for a held lease before it raises
            :class:`LeaseHeldError` (0: do not wait).
        poll_s: seconds between looks while waiting.
    """

    def __init__(
        self,
        location: StorageLocation,
        name: str,
        *,
        ttl_s: float = 120.0,
        wait_s: float = 0.0,
        poll_s: float = 1.0,
    ) -> None:
        if not ttl_s > 0 or wait_s < 0 or not poll_s > 0:
            raise ConfigError(
                f"lease {name!r}: ttl_s={ttl_s}, wait_s={wait_s}, poll_s={poll_s}; expected "
                "ttl_s > 0, wait_s >= 0, poll_s > 0 (seconds)"
            )
        self.location = location
        self.name = name
        self.prefix = location.key(LEASE_PREFIX, name)
        self.ttl_s = float(ttl_s)
        self.wait_s = float(wait_s)
        self.poll_s = float(poll_s)
        self.owner = LeaseOwner.this_process()
        self.waited_s = 0.0
        self._generation: int | None = None
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Lease({self.location.root!r}, {self.name!r})"

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        """Whether this object holds the lease (as far as it knows; see :meth:`check`)."""
        return self._generation is not None and self._lost is None

    def state(self) -> LeaseState | None:
        """The lease's newest generation, or None if it was never taken."""
        return self._newest()[1]

    def acquire(self) -> float:
        """Take the lease, waiting up to ``wait_s``; returns the seconds waited.

        Raises :class:`LeaseHeldError` naming the holder and the expiry if another live owner
        still holds it after ``wait_s``; nothing is written then.
        """
        if self._generation is not None:
            raise StorageError(f"{self} is already held by this object")
        start = time.monotonic()
        told = False
        while True:
            generation, state = self._newest()
            now = datetime.now(UTC)
            if state is None or state.free_at(now):
                try:
                    self._write(generation + 1, now, released=False)
                except CommitConflictError:
                    continue  # another contender took this generation: look again
                self._generation = generation + 1
                self._lost = None
                self.waited_s = time.monotonic() - start
                self._start_heartbeat()
                return self.waited_s
            waited = time.monotonic() - start
            if waited >= self.wait_s:
                raise LeaseHeldError(
                    f"lease {self.name!r} in {self.location.root} is held by {state.owner} "
                    f"since {state.acquired_at:%Y-%m-%d %H:%M:%S} UTC, until "
                    f"{state.expires_at:%Y-%m-%d %H:%M:%S} UTC unless renewed; gave up after "
                    f"{waited:.1f} s (wait_s={self.wait_s:g}); nothing was done"
                )
            if not told:
                _log.info(
                    "lease %r in %s is held by %s until %s UTC unless renewed; waiting up to "
                    "%g s for it",
                    self.name,
                    self.location.root,
                    state.owner,
                    f"{state.expires_at:%Y-%m-%d %H:%M:%S}",
                    self.wait_s,
                )
                told = True
            time.sleep(min(self.poll_s, max(self.wait_s - waited, 0.01)))

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease was taken over (or never held)."""
        if self._generation is None:
            raise LeaseLostError(f"lease {self.name!r} in {self.location.root} is not held")
        if self._lost is not None:
            raise LeaseLostError(self._lost)

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now (the heartbeat calls this)."""
        with self._lock:
            if self._generation is None or self._lost is not None:
                return
            try:
                self._write(self._generation + 1, datetime.now(UTC), released=False)
            except CommitConflictError:
                state = self.state()
                holder = state.owner if state is not None else "another run"
                self._lost = (
                    f"lease {self.name!r} in {self.location.root} expired and was taken over "
                    f"by {holder} (this process did not renew it within ttl_s={self.ttl_s:g})"
                )
                return
            self._generation += 1
        self._clean_older()

    def release(self) -> None:
        """Give the lease back (a no-op if it is not held, or was lost)."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        self._heartbeat = None
        with self._lock:
            generation, self._generation = self._generation, None
            if generation is None or self._lost is not None:
                return
            try:
                self._write(generation + 1, datetime.now(UTC), released=True)
            except CommitConflictError:
                return  # taken over already: nothing of ours to release
        self._clean_older()

    # ---------------------------------------------------------------------------------- private

    def _write(self, generation: int, now: datetime, *, released: bool) -> None:
        state = LeaseState(
            name=self.name,
            generation=generation,
            owner=self.owner,
            acquired_at=now,
            expires_at=now + timedelta(seconds=self.ttl_s),
            released=released,
        )
        data = json.dumps(state.to_json(), indent=1).encode("utf-8")
        self.location.put_bytes(self._key(generation), data, exclusive=True)

    def _newest(self) -> tuple[int, LeaseState | None]:
        for _attempt in range(_READ_ATTEMPTS):
            generations = self._generations()
            if not generations:
                return 0, None
            newest = generations[-1]
            try:
                data = json.loads(self.location.get_bytes(self._key(newest)))
            except NotFoundError:
                continue  # deleted by the holder's clean-up after a newer one: look again
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise StorageError(f"{self.location.uri(self._key(newest))}: {err}") from None
            return newest, LeaseState.from_json(data, where=self.location.uri(self._key(newest)))
        raise StorageError(f"lease {self.name!r}: its generations kept changing while read")

    def _generations(self) -> list[int]:
        out = []
        for key in self.location.list(self.prefix):
            match = _GENERATION.match(key.rsplit("/", 1)[-1])
            if match:
                out.append(int(match.group(1)))
        return sorted(out)

    def _clean_older(self) -> None:
        generations = self._generations()
        for generation in generations[:-1]:
            try:
                self.location.delete(self._key(generation))
            except StorageError:
                return  # clean-up only; the next step tries again

    def _key(self, generation: int) -> str:
        return f"{self.prefix}/{generation:012d}.json"

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"lease-heartbeat-{self.name}", daemon=True
        )
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except StorageError:
                continue  # storage trouble: try again at the next beat, before the expiry
            if self._lost is not None:
                return


def _pid_namespace() -> int | None:
    # Containers on one host share its name but not its processes: compare PID namespaces too.
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
