"""Cluster mode (``BALANCER_NATS_URLS`` set): each region is owned under a lease in NATS KV, with standbys.

Every balancer process runs, for each region in ``BALANCER_REGIONS``, a loop that is either a **standby** (it
tries to take the region's lease every poll interval) or the **owner**. Only the owner has a region service
(:class:`balancer.service.BalancerService`) and so an MQTT session for the region: the service, its core and its
MQTT connection are built when the lease is acquired and thrown away when it is lost. So a standby holds no state
to go stale: on takeover it learns the grid as a restarted balancer does (balancer/startup.py: retained state,
then every agent's re-announcement of its sessions to the new ``instance`` of the retained ``balancer/status``),
resumes the region's persistent MQTT session (same client id: the EV requests and releases sent during the gap are
delivered to it), reads the operator's settings back from KV, and adopts the running sessions.

The owner renews every ``lease_s / 3`` (balancer/region_lease.py). It steps down at once when a renewal is refused,
or when its local monotonic deadline passes without a successful renewal: the service then acts on nothing and
publishes nothing more (it checks the lease before each), its transport never connects again (``may_connect``),
and the loop goes back to standby. An old owner that wakes up after a SIGSTOP finds its deadline passed before it
reads anything; whatever it had already handed to the kernel carries its old epoch, which every agent that has
heard from the new owner refuses (``SessionCommands.epoch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from balancer.gc_policy import PROCESS_GC
from balancer.operator_store import OPERATOR_BUCKET, KvStore
from balancer.region_lease import LEASE_BUCKET, RegionLease
from balancer.service import BalancerService
from balancer.settings import BalancerSettings
from grid_protocol import Topics
from grid_runtime.credentials import mqtt_password
from grid_runtime.lifecycle import wait_event
from grid_runtime.logs import get_logger
from grid_runtime.mqtt import make_transport
from grid_runtime.mqtt.base import TransportBase
from grid_runtime.settings import MqttSettings

__all__ = ["RegionLeaseCollector", "RegionOwner", "connect_nats", "open_buckets", "run_cluster"]

log = get_logger("balancer.cluster")


async def connect_nats(urls: str, mqtt: MqttSettings | None = None) -> Any:
    """A NATS connection that keeps reconnecting (to any of ``urls``) for as long as the process runs. It logs
    in with the balancer's MQTT account (``mqtt``: the cluster's accounts let the balancer's user connect as a
    NATS client for its key-value buckets; broker/nats/config.py), over TLS with ``MQTT_TLS_CA`` when set."""
    import ssl

    import nats

    servers = [u.strip() for u in urls.split(",") if u.strip()]

    async def error_cb(exc: Exception) -> None:
        log.warning("nats_error", error=repr(exc))

    async def disconnected_cb() -> None:
        log.warning("nats_disconnected")

    async def reconnected_cb() -> None:
        log.info("nats_reconnected", url=str(nc.connected_url.netloc if nc.connected_url else None))

    auth: dict[str, Any] = {}
    if mqtt is not None and mqtt.username:
        auth = {"user": mqtt.username, "password": mqtt_password(mqtt)}
    if mqtt is not None and mqtt.tls_ca:
        auth["tls"] = ssl.create_default_context(cafile=mqtt.tls_ca)
    nc = await nats.connect(servers=servers, max_reconnect_attempts=-1, reconnect_time_wait=0.2, **auth,
                            connect_timeout=2, allow_reconnect=True, error_cb=error_cb,
                            disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb,
                            name=f"balancer-{socket.gethostname()}-{os.getpid()}")
    return nc


async def open_buckets(nc: Any, lease_s: float, replicas: int) -> tuple[Any, Any]:
    """The lease bucket (history 1, keys expire ``lease_s`` after their last write) and the operator bucket,
    created if absent (every process asks: the first one creates them)."""
    import nats.js.errors

    js = nc.jetstream()

    async def bucket(name: str, ttl: float | None) -> Any:
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await js.create_key_value(bucket=name, history=1, ttl=ttl, replicas=replicas)
        except nats.js.errors.APIError:  # created by another process meanwhile
            return await js.key_value(name)

    return await bucket(LEASE_BUCKET, lease_s), await bucket(OPERATOR_BUCKET, None)


class RegionOwner:
    """One region in one process: standby until it takes the lease, then the owner until it stops or loses it."""

    def __init__(self, settings: BalancerSettings, region: str, leases_kv: Any, operator_kv: Any) -> None:
        self.settings = settings
        self.region = region
        self.operator_kv = operator_kv
        holder = f"{socket.gethostname()}/{os.getpid()}/{os.urandom(4).hex()}"
        self.lease = RegionLease(leases_kv, region, settings.lease_s, holder)
        #: the service while this process owns the region (None while standby)
        self.service: BalancerService | None = None
        self.takeovers = 0
        self.poll_s = min(0.25, settings.lease_s / 10)
        #: called with every service built on a takeover (metrics: the decision-latency histogram)
        self.on_service: Callable[[BalancerService], None] = lambda _s: None

    def _build(self, epoch: int) -> BalancerService:
        settings, region = self.settings, self.region
        topics = Topics(settings.grid.grid_topic_prefix, region)
        mqtt, client_id = settings.region_mqtt(region)
        transport = make_transport(settings.mqtt_client, mqtt, client_id=client_id,
                                   will=BalancerService.will(topics), clean_start=False)
        if isinstance(transport, TransportBase):
            transport.may_connect = self.lease.held
        service = BalancerService(settings, transport, region=region, store=KvStore(self.operator_kv, region),
                                  epoch=epoch, is_owner=self.lease.held, gc_policy=PROCESS_GC)
        self.on_service(service)
        return service

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await self.lease.acquire():
                await wait_event(stop, self.poll_s)
                continue
            assert self.lease.epoch is not None
            self.takeovers += 1
            await self._own(stop, self.lease.epoch)

    async def _own(self, stop: asyncio.Event, epoch: int) -> None:
        """Run the region's service while the lease holds; renew it every lease/3."""
        service = self.service = self._build(epoch)
        service_stop = asyncio.Event()
        running = asyncio.create_task(service.run(service_stop), name=f"region-{self.region}")
        stopping = asyncio.create_task(stop.wait())
        try:
            every = self.settings.lease_s / 3
            while not stop.is_set() and not running.done():
                await asyncio.wait({stopping, running}, timeout=min(every, self.poll_s * 2))
                if stop.is_set() or running.done():
                    break
                if not self.lease.held():
                    break
                if self.lease.revision and self._renewal_due(every) and not await self.lease.renew():
                    break
        finally:
            stopping.cancel()
            clean = stop.is_set() and self.lease.held()
            if not clean:
                service.stepped_down = True
                self.lease.lose()
                log.error("region_stepped_down", region=self.region, epoch=epoch)
            service_stop.set()
            with contextlib.suppress(Exception):
                await running
            if clean:
                await self.lease.release()
            self.service = None

    def _renewal_due(self, every: float) -> bool:
        return self.lease.remaining() <= self.settings.lease_s - every


class RegionLeaseCollector(Collector):
    """``gridlb_region_owner{region}`` (1 while this process holds the region's lease), ``gridlb_region_epoch``
    (its epoch, 0 while standby) and ``gridlb_region_takeovers_total`` (leases acquired by this process)."""

    def __init__(self, owners: Iterable[RegionOwner]) -> None:
        self._owners = list(owners)

    def collect(self) -> Iterable[Any]:
        owner = GaugeMetricFamily("gridlb_region_owner", "1 while this process holds the region's lease",
                                  labels=["region"])
        epoch = GaugeMetricFamily("gridlb_region_epoch", "Epoch of the region lease held (0: standby)",
                                  labels=["region"])
        takeovers = CounterMetricFamily("gridlb_region_takeovers", "Region leases this process acquired",
                                        labels=["region"])
        for o in self._owners:
            held = o.lease.held()
            owner.add_metric([o.region], float(held))
            epoch.add_metric([o.region], float(o.lease.epoch or 0) if held else 0.0)
            takeovers.add_metric([o.region], float(o.takeovers))
        yield from (owner, epoch, takeovers)


async def run_cluster(settings: BalancerSettings, stop: asyncio.Event,
                      registry: CollectorRegistry | None = None) -> list[RegionOwner]:
    """Connect to NATS, open the buckets, and run one :class:`RegionOwner` per region until ``stop``; with a
    ``registry``, the balancer's metrics of the regions owned at scrape time and the leases' state."""
    assert settings.nats_urls
    nc = await connect_nats(settings.nats_urls, settings.mqtt)
    try:
        leases_kv, operator_kv = await open_buckets(nc, settings.lease_s, settings.nats_replicas)
        owners = [RegionOwner(settings, region, leases_kv, operator_kv) for region in settings.regions]
        if registry is not None:
            from balancer.metrics import register_current

            hook = register_current(lambda: [o.service for o in owners if o.service is not None], registry)
            registry.register(RegionLeaseCollector(owners))
            for o in owners:
                o.on_service = hook
        log.info("cluster_mode", regions=list(settings.regions), lease_s=settings.lease_s,
                 nats=settings.nats_urls)
        await asyncio.gather(*(owner.run(stop) for owner in owners))
        return owners
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
