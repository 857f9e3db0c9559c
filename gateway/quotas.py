"""A tenant's limits at the intake, before a task is registered: rate, budget, what it may ask.

Each limit hit is an error item for the task that hit it, counted in ``tenebra_tenant_refused``
by ``(tenant, limit)``; nothing is dropped and no socket is closed. Clocks are injected: the
gateway's monotonic clock for the token bucket, a wall clock for the budget's UTC day.

The budget is a ledger over the spend the registry already counts (``TaskFigures.spend``, from
the provider's ``cost`` of each result): today's spend is the running total less what it was
when the UTC day began, so counting it costs the hot path nothing. A task's catalogue price is
held from its admission until it ends, so that tasks in flight count before their results do;
between a task's first result and its end both count, which errs toward refusing, never
toward overspending. The ledger is in memory: a restart starts the day's spend again at 0.

With replicas (``TenantQuotas(shared=SharedLimits)``, gateway/store/limits.py) the limits hold
for all of them together: the rate by tokens each client frame takes from a bucket in Redis
(:meth:`TenantQuotas.prepare`, awaited before the frame's tasks are checked), the budget by the
day's spend of every replica (the ledger feeds its own to Redis once per interval) and the
prices the others hold, connections by the others' count; the others' figures are at most one
refresh interval old. Without it nothing here changes, and the per-task check costs what it did.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.admission import FairQueue
from gateway.store.base import TaskRecord
from gateway.store.limits import Grant, LocalFigures
from gateway.tenants import TenantPolicy
from protocol.errors import error_item
from protocol.frames import ErrorItem, ImageTask
from protocol.models import Catalogue

if TYPE_CHECKING:
    from gateway.store.limits import SharedLimits

__all__ = ["DAY", "BudgetLedger", "GrantedTokens", "TenantQuotas", "TokenBucket"]

DAY = 86400.0
# prices are sums of a few decimals: a task that fits the budget exactly must not be refused
_EPSILON = 1e-9


class TokenBucket:
    """``rate`` per second sustained, ``burst`` at once: a tenant's tasks, a socket's polls."""

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def wait(self) -> float:
        """Seconds until a token, as of the last ``take`` (a rate of 0 never refills)."""
        return math.inf if self.rate <= 0 else max(0.0, (1.0 - self.tokens) / self.rate)


class GrantedTokens:
    """The tokens one client frame took from the tenant's bucket shared by every replica: the
    same face as :class:`TokenBucket`, so that the per-task check is the same code."""

    __slots__ = ("burst", "rate", "tokens", "until_next")

    def __init__(self, rate: float, burst: int, tokens: int, until_next: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = tokens
        self.until_next = until_next

    @classmethod
    def none(cls, rate: float, burst: int, clock: Callable[[], float]) -> GrantedTokens:
        """What a check finds when no :meth:`TenantQuotas.prepare` took tokens for the frame:
        nothing (a door that forgot refuses, rather than let each replica its own rate)."""
        return cls(rate, burst, 0, math.inf if rate <= 0 else 1.0 / rate)

    def take(self) -> bool:
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait(self) -> float:
        return self.until_next


class BudgetLedger:
    """Spend per tenant and UTC day, and the prices held for tasks in flight."""

    def __init__(self, spend: dict[str, float], wall_clock: Callable[[], float]) -> None:
        self._spend = spend  # cumulative by tenant, kept by the registry
        self._wall_clock = wall_clock
        self._day = int(wall_clock() // DAY)
        self._baseline = dict(spend)
        self.reserved: dict[str, float] = {}
        self._held: dict[str, tuple[str, float]] = {}  # upstream UUID -> (tenant, price)
        self._shared: SharedLimits | None = None
        self._fed: dict[str, float] = {}  # the running totals as last fed to the shared spend

    def share(self, shared: SharedLimits) -> None:
        """Count every replica's spend: this one's is fed to ``shared`` before each of its
        refreshes, from the registry's running totals (no call per cost), and today's spend
        is the shared total plus what was not fed yet."""
        if self._shared is shared:
            return
        self._shared = shared
        self._fed = dict(self._spend)  # spend before sharing began is this replica's past
        shared.on_push.append(self._feed)

    def _feed(self) -> None:
        shared, fed = self._shared, self._fed
        assert shared is not None
        for tenant, total in self._spend.items():
            added = total - fed.get(tenant, 0.0)
            if added > 0.0:
                shared.add_spend(tenant, added)
                fed[tenant] = total

    def _roll(self) -> None:
        day = int(self._wall_clock() // DAY)
        if day != self._day:
            self._day = day
            self._baseline = dict(self._spend)

    def local_spent_today(self, tenant: str) -> float:
        """This replica's own spend today (all of it, without replicas)."""
        self._roll()
        return self._spend.get(tenant, 0.0) - self._baseline.get(tenant, 0.0)

    def spent_today(self, tenant: str) -> float:
        shared = self._shared
        if shared is None:
            return self.local_spent_today(tenant)
        unfed = self._spend.get(tenant, 0.0) - self._fed.get(tenant, 0.0)
        return shared.spent_today(tenant) + unfed

    def spend_by_tenant(self) -> dict[str, float]:
        if self._shared is not None:
            tenants = self._shared.spend_by_tenant().keys() | self._spend.keys()
            return {tenant: self.spent_today(tenant) for tenant in tenants}
        self._roll()
        base = self._baseline
        return {tenant: total - base.get(tenant, 0.0) for tenant, total in self._spend.items()}

    def seconds_to_next_day(self) -> float:
        now = self._wall_clock()
        return (math.floor(now / DAY) + 1) * DAY - now

    def hold(self, record: TaskRecord, price: float) -> None:
        self._held[record.upstream_uuid] = (record.tenant, price)
        self.reserved[record.tenant] = self.reserved.get(record.tenant, 0.0) + price

    def release(self, record: TaskRecord) -> None:
        """``registry.on_final``: the task's price is no longer held (its cost, if any, is in
        the spend by now)."""
        if not self._held:  # no budgeted task open: every other task's end costs nothing here
            return
        held = self._held.pop(record.upstream_uuid, None)
        if held is not None:
            tenant, price = held
            left = self.reserved[tenant] - price
            if left > _EPSILON:
                self.reserved[tenant] = left
            else:
                del self.reserved[tenant]


class _TenantState:
    """What the intake counts for one limited tenant; it outlives reloads."""

    __slots__ = ("bucket", "connections")

    def __init__(self) -> None:
        self.bucket: TokenBucket | GrantedTokens | None = None
        self.connections = 0


class TenantQuotas:
    def __init__(
        self,
        catalogue: Catalogue,
        ledger: BudgetLedger,
        refused: Counter[tuple[str, str]],
        *,
        clock: Callable[[], float],
        shared: SharedLimits | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.ledger = ledger
        self.refused = refused  # the pool's: one metric family for every limit
        self._clock = clock
        self.shared = shared
        # the per-task check is one code for both: with replicas a tenant's "bucket" is what
        # prepare() took for the frame, and one made by the check itself holds no token
        self._bucket: Callable[[float, int, Callable[[], float]], TokenBucket | GrantedTokens]
        self._bucket = TokenBucket if shared is None else GrantedTokens.none
        if shared is not None:
            ledger.share(shared)
        self._states: dict[str, _TenantState] = {}
        # (model, width, height, numberResults) -> USD: bounded by the catalogue's sizes x 20
        self._prices: dict[tuple[str, int, int, int], float] = {}

    def _state(self, tenant: str) -> _TenantState:
        state = self._states.get(tenant)
        if state is None:
            state = self._states[tenant] = _TenantState()
        return state

    async def prepare(self, tenant: str, policy: TenantPolicy, count: int) -> None:
        """With replicas, before a client frame's ``count`` tasks of ``tenant`` are checked:
        take their tokens from the shared bucket. Raises ``StoreUnavailable`` (the door answers
        the frame's tasks ``serviceUnavailable``). The checks must follow with no await in
        between; tokens a frame took and did not use (tasks refused for something else) are
        dropped at the tenant's next prepare, as a local bucket's are spent."""
        grant = await self.take(tenant, policy, count)
        if grant is not None:
            self.granted(tenant, policy, grant)

    async def take(self, tenant: str, policy: TenantPolicy, count: int) -> Grant | None:
        """:meth:`prepare`'s tokens, not yet the tenant's (:meth:`granted`): None where no
        shared bucket counts them. Raises ``StoreUnavailable``."""
        rate, shared = policy.rate, self.shared
        if rate is None or shared is None or count <= 0:
            return None
        return await shared.take(tenant, count, rate, policy.burst)

    def granted(self, tenant: str, policy: TenantPolicy, grant: Grant) -> None:
        """The tokens the next checks of ``tenant`` use (taken by :meth:`take`)."""
        rate = policy.rate if policy.rate is not None else 0.0
        self._state(tenant).bucket = GrantedTokens(rate, policy.burst, grant.tokens, grant.wait)

    def check(self, policy: TenantPolicy, task: ImageTask) -> ErrorItem | float:
        """The task's error, or its price to hold (0 when the tenant has no budget). Checked
        in this order: what the task asks (permanent), the budget, then the rate, so that a
        task refused by another of the tenant's limits does not spend a token (one refused
        later, by the destination check or as a conflict, has spent it)."""
        name = policy.name
        cap = policy.max_number_results
        if cap is not None and task.numberResults > cap:
            return self._refuse(
                name, "tenant_max_number_results", "invalidNumberResults", task,
                f"Invalid value for numberResults parameter. This API key may ask for at most "
                f"{cap} results per task.", parameter="numberResults", type="integer",
            )  # fmt: skip
        if not policy.allow_webhooks and isinstance(task.webhookURL, str):
            return self._refuse(
                name, "tenant_allow_webhooks", "unsupportedParameter", task,
                "Webhooks are not enabled for this API key: send the task without webhookURL.",
                parameter="webhookURL", type="string",
            )  # fmt: skip
        if not policy.allow_uploads and isinstance(task.uploadEndpoint, str):
            return self._refuse(
                name, "tenant_allow_uploads", "unsupportedParameter", task,
                "Uploads are not enabled for this API key: send the task without "
                "uploadEndpoint.", parameter="uploadEndpoint", type="string",
            )  # fmt: skip
        price = 0.0
        budget = policy.budget_per_day
        if budget is not None:
            price = self._price(task)
            ledger = self.ledger
            shared = self.shared
            if shared is None:
                spent = ledger.local_spent_today(name)
                held = ledger.reserved.get(name, 0.0)
            else:
                spent = ledger.spent_today(name)
                held = ledger.reserved.get(name, 0.0) + shared.others(name).held
            if spent + held + price > budget + _EPSILON:
                return self._refuse(
                    name, "tenant_budget_per_day", "insufficientCredits", task,
                    f"The daily budget of this API key is ${budget:.4f} (UTC day): "
                    f"${spent:.4f} spent today and ${held:.4f} held for tasks in flight leave "
                    f"less than this task's ${price:.4f}. It resets at 00:00 UTC.",
                )  # fmt: skip
        rate = policy.rate
        if rate is not None:
            state = self._state(name)
            bucket = state.bucket
            if bucket is None or bucket.rate != rate or bucket.burst != policy.burst:
                bucket = state.bucket = self._bucket(rate, policy.burst, self._clock)  # reloaded
            if not bucket.take():
                return self._refuse(
                    name, "tenant_rate", "rateLimitExceeded", task,
                    f"This API key may send {rate:g} tasks per second (bursts of "
                    f"{policy.burst}). Retry in {bucket.wait():.2f} s.",
                )  # fmt: skip
        return price

    def _price(self, task: ImageTask) -> float:
        """The catalogue's price, remembered: it is summed in Decimal (exact cents), which
        costs more than the rest of the check, and a deployment asks for a few sizes only."""
        key = (task.model, task.width, task.height, task.numberResults)
        price = self._prices.get(key)
        if price is None:
            model = self.catalogue.get(task.model)
            assert model is not None  # decoding checked the model and its size
            price = self._prices[key] = model.price(task.width, task.height, task.numberResults)
        return price

    def _refuse(
        self,
        tenant: str,
        limit: str,
        code: str,
        task: ImageTask,
        message: str,
        *,
        parameter: str | None = None,
        type: str | None = None,
    ) -> ErrorItem:
        self.refused[tenant, limit] += 1
        return error_item(
            code,
            message=message,
            parameter=parameter,
            type=type,
            task_type="imageInference",
            task_uuid=task.taskUUID,
        )

    # ------------------------------------------------------------------ connections

    def connect(self, tenant: str, policy: TenantPolicy | None) -> ErrorItem | None:
        """An authentication of ``tenant`` opens a socket: its error past the tenant's
        ``max_connections``. Every tenant's sockets are counted (a reload may give a limit to
        a tenant that had none); each success is to be matched by one :meth:`disconnect`."""
        state = self._state(tenant)
        if policy is not None and not self.has_room(tenant, policy):
            self.refused[tenant, "tenant_max_connections"] += 1
            cap = policy.max_connections
            return error_item(
                "rateLimitExceeded",
                message=f"This API key may hold {cap} connections at once. Close one, or retry "
                "with backoff.",
                task_type="authentication",
            )
        state.connections += 1
        return None

    def has_room(self, tenant: str, policy: TenantPolicy | None) -> bool:
        """Whether a socket of ``tenant`` fits under its ``max_connections`` (every replica's)."""
        cap = policy.max_connections if policy is not None else None
        if cap is None:
            return True
        others = self.shared.others(tenant).connections if self.shared is not None else 0
        return self.connections(tenant) + others < cap

    def disconnect(self, tenant: str) -> None:
        state = self._states.get(tenant)
        if state is not None and state.connections > 0:
            state.connections -= 1

    def connections(self, tenant: str) -> int:
        state = self._states.get(tenant)
        return state.connections if state is not None else 0

    def local_figures(self, queue: FairQueue[Any]) -> dict[str, LocalFigures]:
        """This replica's own figures by tenant, for ``SharedLimits(local=...)``: tasks at the
        provider and waiting (from the pool's queue), sockets, budget held."""
        figures: dict[str, LocalFigures] = {}
        reserved = self.ledger.reserved
        names = set(queue.tenants()) | reserved.keys()
        names.update(name for name, state in self._states.items() if state.connections)
        for name in names:
            state = self._states.get(name)
            figures[name] = LocalFigures(
                queue.in_flight(name),
                queue.waiting(name),
                state.connections if state is not None else 0,
                reserved.get(name, 0.0),
            )
        return figures

    def retry_after(self, tenant: str, code: str) -> int | None:
        """Whole seconds a REST client should wait before trying again after ``code``, for
        ``Retry-After``; None where waiting does not help."""
        if code == "insufficientCredits":
            return max(1, math.ceil(self.ledger.seconds_to_next_day()))
        if code != "rateLimitExceeded":
            return None
        state = self._states.get(tenant)
        bucket = state.bucket if state is not None else None
        if bucket is None:
            return 1  # a queue or connection bound: room comes back as tasks end
        return max(1, math.ceil(bucket.wait()))


class BudgetFigures(Collector):
    """``tenebra_tenant_spent_today_usd``: the budget's view of each tenant's spend."""

    def __init__(self, ledger: BudgetLedger) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[Metric]:
        spent = GaugeMetricFamily(
            "tenebra_tenant_spent_today_usd",
            "Provider cost of the tenant's tasks since 00:00 UTC",
            labels=["tenant"],
        )
        for tenant, amount in self._ledger.spend_by_tenant().items():
            spent.add_metric([tenant], amount)
        yield spent
        held = GaugeMetricFamily(
            "tenebra_tenant_budget_held_usd",
            "Catalogue price of the tenant's budgeted tasks in flight",
            labels=["tenant"],
        )
        for tenant, amount in self._ledger.reserved.items():
            held.add_metric([tenant], amount)
        yield held
