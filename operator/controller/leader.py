"""Leader election over a coordination.k8s.io/v1 Lease, so the chart can run two replicas.

Every replica watches (its caches stay warm); only the holder of the Lease reconciles. The holder renews
every `retry_period`; a follower takes the Lease over once it has seen the same holder and renewTime for
longer than `lease_duration` (time measured on the follower's own clock since it last saw the Lease
change, as client-go does, so replicas' clocks need not agree). Every write to the Lease carries the
resourceVersion read, so two followers racing for it cannot both win. A leader that cannot renew within
`renew_deadline` (shorter than the lease duration) stops reconciling before anyone else may start, and
the process exits so Kubernetes restarts it as a follower.

kopf's own peering is not used: it is priority-based, and peers of equal priority all pause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from conveyor.operator.controller import metrics
from conveyor.operator.controller.client import ApiClient, ApiError, Conflict, resource_path

log = logging.getLogger("conveyor.operator.leader")


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str = "conveyor-operator"
    identity: str = ""
    lease_duration: float = 10.0
    renew_deadline: float = 7.0
    retry_period: float = 2.0


def _microtime(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        client: ApiClient,
        config: LeaseConfig,
        *,
        on_started: Callable[[], None],
        on_stopped: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._config = config
        self._on_started = on_started
        self._on_stopped = on_stopped
        self._clock = clock
        self._path = resource_path("coordination.k8s.io/v1", "leases", config.namespace, config.name)
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self.leading = False

    async def run(self) -> None:
        """Acquire, then renew until renewing fails past the deadline (then return: the caller exits)."""
        while not self.leading:
            if await self._try_acquire_or_renew():
                self.leading = True
                metrics.LEADER.set(1)
                log.info("%s leads (Lease %s/%s)", self._config.identity, self._config.namespace, self._config.name)
                self._on_started()
            else:
                await asyncio.sleep(self._config.retry_period)
        last_renew = self._clock()
        while True:
            await asyncio.sleep(self._config.retry_period)
            if await self._try_acquire_or_renew():
                last_renew = self._clock()
            elif self._clock() - last_renew > self._config.renew_deadline:
                log.error("%s could not renew the Lease within %.0fs: stepping down", self._config.identity, self._config.renew_deadline)
                self.leading = False
                metrics.LEADER.set(0)
                await self._on_stopped()
                return

    async def release(self) -> None:
        """On a clean shutdown, hand the Lease over at once (the next replica need not wait it out)."""
        if not self.leading:
            return
        lease = await self._client.get(self._path, resource="Lease")
        if lease and (lease.get("spec") or {}).get("holderIdentity") == self._config.identity:
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["leaseDurationSeconds"] = 1
            try:
                await self._client.request("PUT", self._path, body=lease, resource="Lease")
            except ApiError as e:
                log.warning("could not release the Lease: %s", e)

    async def _try_acquire_or_renew(self) -> bool:
        try:
            lease = await self._client.get(self._path, resource="Lease")
            now = datetime.now(UTC)
            if lease is None:
                await self._client.request(
                    "POST",
                    resource_path("coordination.k8s.io/v1", "leases", self._config.namespace),
                    body=self._lease_body(None, now, transitions=0),
                    resource="Lease",
                )
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            seen = (holder, spec.get("renewTime") or "")
            if seen != self._observed:
                self._observed, self._observed_at = seen, self._clock()
            duration = float(spec.get("leaseDurationSeconds") or self._config.lease_duration)
            if holder and holder != self._config.identity and self._clock() - self._observed_at < duration:
                return False  # someone else holds it and renews
            transitions = int(spec.get("leaseTransitions") or 0) + (0 if holder == self._config.identity else 1)
            body = self._lease_body(lease, now, transitions=transitions)
            await self._client.request("PUT", self._path, body=body, resource="Lease")
            return True
        except Conflict:
            return False  # another replica wrote it between our read and our write
        except ApiError as e:
            log.warning("Lease %s/%s: %s", self._config.namespace, self._config.name, e)
            return False

    def _lease_body(self, lease: dict[str, Any] | None, now: datetime, *, transitions: int) -> dict[str, Any]:
        spec = dict((lease or {}).get("spec") or {})
        if spec.get("holderIdentity") != self._config.identity:
            spec["acquireTime"] = _microtime(now)
        spec.update(
            holderIdentity=self._config.identity,
            leaseDurationSeconds=int(self._config.lease_duration),
            renewTime=_microtime(now),
            leaseTransitions=transitions,
        )
        metadata = {"name": self._config.name, "namespace": self._config.namespace}
        if lease is not None:
            metadata["resourceVersion"] = lease["metadata"]["resourceVersion"]
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}
