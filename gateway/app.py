"""The gateway application: what starts in which order, what stops in which order.

Start: the embedded local provider (when no provider URL is configured), the provider links,
then the client-facing server. Stop: refuse new connections and tasks, wait for in-flight tasks
up to the drain deadline, close clients with 1012 so SDKs reconnect elsewhere, close the
provider links, stop the embedded provider.

Routes: WebSocket ``GET /v1`` and ``GET /``; REST ``POST /v1``; ``GET /metrics`` (Prometheus,
behind a bearer token when ``server.metrics_token`` is set); ``GET /healthz`` (the process
answers); ``GET /readyz`` (200 only while a provider link is authenticated).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.admission import TenantLimits
from gateway.audit import Audit
from gateway.clients import ClientGateway
from gateway.cluster import Cluster, default_replica_name
from gateway.config import Config, ConfigError
from gateway.console import install as install_console
from gateway.delivery.deliveries import Deliveries
from gateway.delivery.egress import EgressGuard
from gateway.delivery.jobs import RedisJobs
from gateway.intake import Intake
from gateway.metrics import Metrics
from gateway.pool import UpstreamPool
from gateway.quotas import DAY, BudgetFigures, BudgetLedger, TenantQuotas
from gateway.replication import Replication, links_key
from gateway.rest import RestEndpoint
from gateway.roaming import Roaming
from gateway.store.base import Delivery
from gateway.store.connection import RedisConnection
from gateway.store.limits import SharedLimits, shared_limits
from gateway.store.memory import MemoryTaskStore
from gateway.store.redis import RedisSharedTasks
from gateway.store.shared import StoreUnavailable
from gateway.takeover import Takeover
from gateway.tasks import TaskRegistry
from gateway.telemetry import Telemetry, from_env
from gateway.tenants import Revoked, TenantTable, forget_plain_keys
from gateway.usage import Usage, UsageEndpoint, admin_digests
from protocol.errors import error_item
from protocol.models import Catalogue, default_catalogue

if TYPE_CHECKING:  # the local provider is an optional install (numpy, Pillow): imported when used
    from gateway.provider.server import LocalProvider

__all__ = ["Gateway"]

# The failure webhooks of tasks failed at the drain deadline get at least this long to leave.
FINAL_WEBHOOKS_GRACE = 1.0

log = structlog.get_logger("tenebra.app")


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        catalogue: Catalogue | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        reuse_port: bool = False,
        telemetry: Telemetry | None = None,
    ) -> None:
        """``telemetry``: tracing as given (tests); None: as the ``OTEL_*`` variables ask."""
        self.config = config
        self.reuse_port = reuse_port  # SO_REUSEPORT: serve --workers N share one port
        self.catalogue = catalogue or default_catalogue()
        self.clock = clock
        self.wall_clock = wall_clock
        self.tenants = TenantTable.from_config(config)  # swapped whole by reload_tenants
        self.admin_keys = admin_digests(config)  # GET /v1/usage of every tenant
        forget_plain_keys(config)
        self.metrics = Metrics()
        self.store = MemoryTaskStore(
            retention=config.tasks.retention, max_finished=config.tasks.max_retained
        )
        self.registry = TaskRegistry(
            self.store, max_open=config.tasks.max_open, clock=clock, metrics=self.metrics
        )
        self.metrics.tasks_in_flight.set_function(lambda: self.store.open_count)
        self.metrics.task_records.set_function(lambda: len(self.store))
        self.budgets = BudgetLedger(self.metrics.tasks.spend, wall_clock)
        self.registry.on_final.append(self.budgets.release)
        self.metrics.registry.register(BudgetFigures(self.budgets))
        self.provider: LocalProvider | None = None
        self.pool: UpstreamPool | None = None
        self.guard = EgressGuard(config.delivery.allow)
        self.redis: RedisConnection | None = None
        self.cluster: Cluster | None = None
        self.limits: SharedLimits | None = None
        self.replication: Replication | None = None
        # a name per start: a replica restarted at once under its configured name must not
        # renew the lease of the one that died, whose tasks are then taken over
        # set when another replica took this one over: the process stops (gateway.cluster)
        self.fenced = asyncio.Event()
        self.replica = (
            f"{config.store.replica}-{secrets.token_hex(3)}"
            if config.store.replica
            else default_replica_name()
        )
        if config.store.url is not None:
            self._share(config.store.url)
        self.deliveries = Deliveries(
            config.delivery,
            self.guard,
            self.metrics,
            config.tenants,
            jobs=RedisJobs(self.redis) if self.redis is not None else None,
            replica=self.replica,
            lease=config.store.lease,
            on_outcome=self._delivery_outcome,
        )
        # issue 15: the audit trail, the usage ledger, traces (gateway/audit.py, usage.py,
        # telemetry.py): hooks on what happens anyway; when off, no hook at all
        self.audit = Audit.from_logging(config.server.audit)
        self.usage = Usage(wall_clock=wall_clock, redis=self.redis)
        self.registry.on_final_batch.append(self.usage.add_many)
        if self.audit is not None:
            self.registry.on_final_batch.append(self.audit.tasks)
        self.telemetry = telemetry if telemetry is not None else from_env()
        if self.telemetry is not None:
            self.telemetry.install(self.registry, self.deliveries)
        self.intake: Intake | None = None
        self.clients: ClientGateway | None = None
        self._runner: web.AppRunner | None = None
        self._janitor: asyncio.Task[None] | None = None
        self.port = 0

    def _share(self, url: str) -> None:
        """``store.url``: tasks, sessions, deliveries and limits shared with other replicas."""
        settings = self.config.store
        self.redis = RedisConnection.from_url(
            url,
            deadline=settings.timeout,
            max_connections=settings.max_connections,
            prefix=settings.prefix,
        )
        shared = RedisSharedTasks(
            self.redis,
            max_retained=self.config.tasks.max_retained,
            # an open task's claim outlives any task; a dead replica's that nobody took over
            # goes in the end
            open_ttl=2 * self.config.tasks.timeout,
        )
        self.cluster = Cluster(self.redis, self.replica, settings.lease)
        self.cluster.on_fenced.append(self._fenced)
        self.replication = Replication(
            shared,
            self.replica,
            retention=self.config.tasks.retention,
            max_pending=self.config.tasks.max_retained,
            new_uuid=self.registry.new_uuid,
            dropped=self.metrics.store_writes_dropped,
        )
        self.registry.changed = self.replication.changed
        self.registry.durable = self.replication.after_write

    def _delivery_outcome(self, tenant: str, task_uuid: str, delivery: Delivery) -> None:
        """A delivery attempt's outcome: the record that lists it is written again."""
        record = self.registry.lookup(tenant, task_uuid)
        if record is not None and self.replication is not None:
            self.replication.changed(record)
        if self.audit is not None and delivery.state != "pending":
            self.audit.delivery(tenant, task_uuid, delivery)

    @property
    def url(self) -> str:
        return f"ws://{self.config.server.host}:{self.port}/v1"

    async def start(self) -> None:
        settings = self.config.provider
        url, key = settings.url, settings.api_key
        if url is None:  # no provider key either: the configuration sets Runware's URL with one
            from gateway.provider.server import LocalProvider, ProviderConfig

            key = secrets.token_urlsafe(24)
            # its images are synthetic: billed at 0 unless asked to show what Runware would charge
            self.provider = LocalProvider(
                ProviderConfig(
                    keys=frozenset({key}),
                    priced=settings.local_cost,
                    # the operator's egress allow-list opens the same destinations for the
                    # reference images the embedded provider fetches
                    allow=list(self.config.delivery.allow),
                )
            )
            await self.provider.start("127.0.0.1", 0)
            url = self.provider.url
            log.info("local provider started", url=url)
        assert key is not None  # the configuration requires a key with a URL
        if self.provider is not None:
            self.deliveries.trusted_origins.add(self.provider.public_url)
        else:
            # a provider on a private network serves its images on the same host and port
            parts = urlsplit(url)
            scheme = "https" if parts.scheme == "wss" else "http"
            self.deliveries.trusted_origins.add(f"{scheme}://{parts.netloc}".lower())
        await self.deliveries.start()
        self.pool = UpstreamPool(
            url, key, settings, self.registry, self.metrics, limits=self._tenant_limits
        )
        pool = self.pool
        if self.redis is not None:  # limits hold across every replica together
            self.limits = SharedLimits(
                self.redis,
                self.replica,
                local=lambda: quotas.local_figures(pool.queue),
                wall_clock=self.wall_clock,
            )
            self.limits.on_refresh.append(pool.limits_changed)
        quotas = TenantQuotas(
            self.catalogue,
            self.budgets,
            self.pool.refused_by_limit,
            clock=self.clock,
            shared=self.limits,
        )
        intake = self.intake = Intake(
            self.catalogue,
            self.registry,
            self.pool,
            self.tenants,
            self.metrics,
            max_tasks_per_frame=self.config.server.max_tasks_per_frame,
            guard=self.guard,
            deliveries=self.deliveries,
            quotas=quotas,
            replication=self.replication,
        )
        intake.audit, intake.telemetry = self.audit, self.telemetry
        if self.audit is not None:
            audit = self.audit
            self.pool.on_limit = lambda record, limit, code: audit.limit(
                record.tenant, limit, code, record.key_id, record.task_uuid
            )
        self.clients = ClientGateway(self.config.server, intake, self.metrics, clock=self.clock)
        if self.redis is not None and self.cluster is not None:
            self.clients.roaming = Roaming(
                self.redis,
                self.cluster,
                self.clients.table,
                # a replica that dies leaves its sessions' entries this long at most
                attached_ttl=DAY,
                clock=self.clock,
            )
        rest = RestEndpoint(
            intake,
            self.metrics,
            sync_deadline=self.config.server.rest_sync_deadline,
            get_response_burst=self.config.server.get_response_burst,
            throttle=self.clients.throttle,  # one count of failures per address for both doors
            addresses=self.clients.addresses,
            read_timeout=self.config.server.request_read_timeout,
            keyless_body_bytes=self.config.server.max_keyless_request_bytes,
        )

        app = web.Application(client_max_size=self.config.server.max_frame_bytes)
        app.router.add_get("/v1", self.clients.handle)
        app.router.add_get("/", self.clients.handle)
        app.router.add_post("/v1", rest.handle)
        app.router.add_get("/v1/tasks/{task_uuid}", rest.task_view)
        usage = UsageEndpoint(
            self.usage,
            intake.tenant_of,
            self.admin_keys,
            self.clients.throttle,
            self.clients.addresses,
            self.audit,
        )
        app.router.add_get("/v1/usage", usage.handle)
        self.usage.start()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        install_console(app, self)  # GET /console, /playground and theirs (gateway/console/)
        await self.pool.start()
        # aiohttp arms its keep-alive timer at accept: a connection that never completes a
        # request (a half-sent request line, dripping headers) is closed when it fires
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            keepalive_timeout=self.config.server.handshake_timeout,
        )
        if self.redis is not None and self.cluster is not None and self.replication is not None:
            self.pool.on_session = self.replication.link_session
            self.replication.lease_in_doubt = self.cluster.lease_in_doubt
            replication, pool = self.replication, self.pool
            self.cluster.on_renewed.append(lambda: replication.record_links(pool.sessions()))
            self.cluster.takeovers.append(
                Takeover(
                    self.redis,
                    self.replication,
                    self.registry,
                    self.pool,
                    self.clients.roaming,
                    self.deliveries,
                )
            )
            await self.cluster.start()  # last: a takeover needs everything above
        if self.limits is not None:
            await self.limits.start()
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.config.server.host,
            self.config.server.port,
            reuse_port=self.reuse_port or None,
        )
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._janitor = asyncio.create_task(self._sweep_forever())
        log.info("gateway listening", url=self.url)

    async def stop(self) -> None:
        """Drain, then close: clients get 1012 so their SDKs reconnect elsewhere. A fenced
        replica (another took it over) does not drain: its tasks are the other's now."""
        if self.intake is not None:  # no new connections, no new tasks
            self.intake.accepting = False
        if self.cluster is not None:
            self.cluster.pause_takeovers()  # a stopping replica takes nobody's tasks
            if self.cluster.fenced:
                await self._stop_fenced()
                return
        drained = asyncio.Event()

        def on_final(record: object) -> None:
            if self.store.open_count == 0:
                drained.set()

        self.registry.on_final.append(on_final)
        on_final(None)
        started = self.clock()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drained.wait(), self.config.server.drain_deadline)
        left = self.config.server.drain_deadline - (self.clock() - started)
        # with replicas, tasks still open are left to another (gateway.takeover), which resumes
        # their provider sessions: their clients resume their sessions there
        hand_over = bool(self.store.open_count) and self._can_hand_over()
        if self.store.open_count and not hand_over:
            self._fail_open_tasks()
            if self.replication is not None:  # the errors wait for their write (or one try)
                await self.replication.drain(self.config.store.timeout * 2)
            await asyncio.sleep(0)  # the sockets' flush runs: the errors leave before 1012
            left = max(left, FINAL_WEBHOOKS_GRACE)
        await self.deliveries.drain(max(0.0, left))
        if self.clients is not None:
            await self.clients.close_all(1012, b"service restart")
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        if self.pool is not None:
            await self.pool.close()
        await self.deliveries.close()
        if self.clients is not None and self.clients.roaming is not None:
            await self.clients.roaming.close()
        if self.replication is not None:
            await self.replication.drain(self.config.store.timeout * 2)
            await self.replication.close()
        if self.limits is not None:
            await self.limits.stop()
        if self.cluster is not None:
            await self.cluster.stop(hand_over=hand_over)
            if hand_over:
                log.info("open tasks left to another replica", tasks=self.store.open_count)
            elif self.redis is not None:  # its provider sessions are no one's to resume now
                redis, key = self.redis, links_key(self.redis, self.replica)
                with contextlib.suppress(StoreUnavailable):
                    await redis.call(lambda: redis.client.delete(key))
        await self._close()

    async def _stop_fenced(self) -> None:
        """Another replica took this one over (it lost Redis longer than its lease): what it
        holds is the other's. Nothing is failed, nothing written any more; clients get 1012
        and resume their sessions where their tasks are now."""
        log.error(
            "this replica was taken over by another: it stops without its tasks",
            replica=self.replica,
            tasks=self.store.open_count,
        )
        if self.replication is not None:
            # no write under this name from here on, and no frame held: the taker sends them
            await self.replication.close(deliver_held=False)
        if self.clients is not None:
            await self.clients.close_all(1012, b"service restart")
        if self._janitor is not None:
            self._janitor.cancel()
        if self.pool is not None:
            await self.pool.close()
        await self.deliveries.close()  # their jobs are claimed by the others
        if self.clients is not None and self.clients.roaming is not None:
            await self.clients.roaming.close()
        if self.limits is not None:
            await self.limits.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        await self._close()

    def _fenced(self) -> None:
        """``cluster.on_fenced``: ``tenebra serve`` then stops the gateway, exit status 1."""
        self.fenced.set()

    async def _close(self) -> None:
        self.registry.flush_final()  # the last turn's records, before the audit and usage flush
        await self.usage.close()  # its last figures, before the connection goes
        if self.audit is not None:
            self.audit.flush()
        if self.telemetry is not None:
            self.telemetry.shutdown()
        if self.redis is not None:
            await self.redis.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.provider is not None:
            await self.provider.stop()

    def _tenant_limits(self, tenant: str) -> TenantLimits:
        limits = self.tenants.limits(tenant)
        if self.limits is not None:  # less what the other replicas use now
            return shared_limits(limits, self.limits.others(tenant))
        return limits

    def reload_tenants(self, load: Callable[[], Config]) -> Revoked | None:
        """SIGHUP: tenants, keys and their limits from the configuration again, swapped in at
        once; what was revoked, or None when the configuration does not load (the old table
        stays, and the log says why). Other settings are read at start only."""
        try:
            config = load()
            table = TenantTable.from_config(config, previous=self.tenants)
        except (ConfigError, ValueError) as exc:
            log.error("tenants not reloaded: the configuration does not load", error=str(exc))
            return None
        forget_plain_keys(config)
        revoked = self.tenants.revoked_by(table)
        self.tenants = table
        self.config.tenants = config.tenants
        self.deliveries.tenants = config.tenants  # webhook secrets and envelopes
        if self.intake is not None:
            self.intake.use_tenants(table)
        if self.pool is not None:
            self.pool.limits_changed()
        # sockets of revoked keys and tenants close with 4003; nobody else is disturbed
        closed = self.clients.close_revoked(revoked) if self.clients is not None else 0
        log.info(
            "tenants reloaded",
            tenants=len(table),
            revoked_keys=len(revoked.keys),
            revoked_tenants=sorted(revoked.tenants),
            closed_connections=closed,
        )
        return revoked

    def _can_hand_over(self) -> bool:
        """Another replica may take this one's open tasks: the store is shared and answers."""
        return self.cluster is not None and self.cluster.healthy

    def _fail_open_tasks(self) -> None:
        """Past the drain deadline, every task still open ends with a clear error on its
        socket (and its webhook) instead of a silent close."""
        deadline = self.config.server.drain_deadline
        for record in self.store.open_records():
            self.registry.fail(
                record,
                error_item(
                    "serviceUnavailable",
                    message=f"The gateway shut down before the task finished ({deadline:g} s "
                    "drain deadline). It may still be billed by the provider; retry elsewhere.",
                    task_type="imageInference",
                    task_uuid=record.task_uuid,
                ),
            )

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            refused = self.pool.was_refused if self.pool is not None else None
            self.registry.expire(self.config.tasks.timeout, refused)
            self.registry.sweep()
            if self.clients is not None:
                self.clients.sweep()

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        token = self.config.server.metrics_token
        if token is not None:  # the figures include each tenant's spend
            given = request.headers.get("Authorization", "").encode()
            if not secrets.compare_digest(given, f"Bearer {token}".encode()):
                raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        ready = (
            self.pool is not None
            and self.pool.ready
            and self.intake is not None
            and self.intake.accepting
        )
        body: dict[str, object] = {
            "links": [link.state.value for link in self.pool.links] if self.pool else []
        }
        if self.cluster is not None and self.replication is not None:
            # a replica that cannot reach Redis accepts no task: others may run it. The lease,
            # renewed every third of store.lease, is the probe: a failed call elsewhere does
            # not keep a replica unready after Redis is back
            store = self.cluster.healthy
            ready = ready and store
            body["store"] = "ok" if store else "unavailable"
            body["replica"] = self.replica
        body["ready"] = ready
        return web.json_response(body, status=200 if ready else 503)
