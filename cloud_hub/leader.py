"""Which hub replica leads: a lease in the shared database (the registry's ``leases`` table).

Several ``cloud-hub serve --replica NAME`` processes share one broker and one database. Each consumes
its share of the devices' messages (MQTT shared subscriptions), answers the admin API and serves the OIP
models; one at a time, the leader, also drives the rollout engine, the drift job and the chunk rounds of
artifact fan-out. The leader renews its lease every ``ttl_s / 3``; a replica that cannot renew (killed,
cut off from the database) stops acting as leader at once and the lease expires ``ttl_s`` after its
last renewal, when another replica takes it (``Registry.try_lead``: one statement on the database's
clock, so replicas' clocks need not agree). A leader that stops cleanly gives the lease up at once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from cloud_hub.registry import Registry

log = logging.getLogger(__name__)
LEASE = "hub-leader"
DEFAULT_TTL_S = 5.0


class LeaderLease:
    def __init__(self, registry: Registry, replica: str, ttl_s: float = DEFAULT_TTL_S,
                 on_change: Callable[[bool], None] | None = None) -> None:  # fmt: skip
        self.registry, self.ttl_s = registry, ttl_s
        self.holder = f"{replica}/{uuid.uuid4().hex[:8]}"  # this process: a restarted replica is a new holder
        self._on_change = on_change or (lambda leading: None)
        self._valid_until = 0.0  # monotonic: when this replica must stop acting as leader without a renewal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgefed-leader", daemon=True)

    def leading(self) -> bool:
        """True while this replica holds a lease it renewed less than ``ttl_s / 2`` ago (it stops acting
        before the lease can pass to another replica)."""
        return time.monotonic() < self._valid_until

    def start(self) -> None:
        self._renew()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.ttl_s)
        was = self.leading()
        self._valid_until = 0.0
        try:
            self.registry.resign(LEASE, self.holder)
        except Exception as exc:  # the database is gone too: the lease expires by itself
            log.warning("could not give the leader lease up (%s); it expires in %.0f s", exc, self.ttl_s)
        if was:
            self._on_change(False)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            self._renew()

    def _renew(self) -> None:
        was = self.leading()
        asked = time.monotonic()
        try:
            held = self.registry.try_lead(LEASE, self.holder, self.ttl_s)
        except Exception as exc:  # cannot reach the database: not the leader until it can
            log.warning("leader lease: %s", exc)
            held = False
        self._valid_until = asked + self.ttl_s / 2 if held else 0.0
        if held != was:
            log.info("replica %s %s the leader", self.holder, "is now" if held else "is no longer")
            self._on_change(held)
