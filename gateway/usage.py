"""The usage ledger: spend, images and tasks per tenant, per key id, per UTC day.

Fed from the registry's ``on_final`` hook: a finished task adds its provider cost (all of it,
whether or not its client asked to see it: ``TaskRecord.cost``), its images and one task to
(its UTC day of finish, its tenant, its key id). A dict lookup and three additions per task.

Where it is kept:

- **In memory** (no ``store.url``): in this process, gone at a restart. Bounded: ``DAYS_KEPT``
  UTC days (older days dropped as a new one starts) of at most ``MAX_PAIRS_PER_DAY``
  (tenant, key id) pairs each; past that a day counts further keys of a tenant under the key id
  ``other``. Keys come from the configuration, so a day holds at most (keys in the
  configuration, a reload's new keys included) pairs: about 200 bytes each, 400 days of 100
  keys is some 8 MB.
- **In Redis** (``store.url``): a hash per UTC day (``<prefix>:usage:<YYYY-MM-DD>``, fields
  ``<tenant>:<key id>:s|i|t`` for spend, images, tasks), kept ``DAYS_KEPT`` days. Each replica
  adds what its tasks spent since its last flush, once per ``flush_interval`` (1 s): one
  script of HINCRBYFLOAT / HINCRBY through ``RedisConnection.call``, so the task path never
  waits on Redis. A flush that fails is sent again as it is, under a number Redis adds once
  (its answer may have been lost after it ran), before what was added since (each bounded as
  above), and the gateway flushes once more as it stops. It survives restarts; a reading is
  Redis's figures plus this replica's not yet flushed (another replica's last second may be
  missing).

``GET /v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD`` (:class:`UsageEndpoint`): a tenant's own rows
with one of its keys as ``Authorization: Bearer``, every tenant's with an admin key; both dates
default to today (UTC), ``to`` not before ``from``, at most ``MAX_RANGE_DAYS`` days.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from aiohttp import web

from gateway.audit import Audit
from gateway.clients import too_many_failures
from gateway.config import Config
from gateway.store.base import TaskRecord
from gateway.store.connection import RedisConnection, key_part
from gateway.store.shared import StoreUnavailable
from gateway.tenants import hash_key
from gateway.throttle import AuthThrottle, ClientAddresses
from protocol.frames import ErrorItem

__all__ = ["Usage", "UsageEndpoint", "UsageRow", "admin_digests"]

log = structlog.get_logger("tenebra.usage")

DAY = 86400
DAYS_KEPT = 400
MAX_PAIRS_PER_DAY = 10_000
MAX_RANGE_DAYS = 366
OTHER_KEY = "other"
NO_KEY = "-"  # a task whose record carries no key id (taken over from an older version)
_EPOCH = datetime.date(1970, 1, 1)
_METRICS = ("s", "i", "t")


class UsageRow(msgspec.Struct, gc=False):
    day: str
    tenant: str
    key_id: str
    spend: float
    images: int
    tasks: int


class _Entry:
    __slots__ = ("images", "spend", "tasks")

    def __init__(self) -> None:
        self.spend = 0.0
        self.images = 0
        self.tasks = 0


Days = dict[int, dict[tuple[str, str], _Entry]]


def day_text(day: int) -> str:
    return (_EPOCH + datetime.timedelta(days=day)).isoformat()


def parse_day(text: str) -> int:
    """Days since 1970-01-01 of ``YYYY-MM-DD``; ValueError otherwise."""
    if len(text) != 10:
        raise ValueError(text)
    return (datetime.date.fromisoformat(text) - _EPOCH).days


class Usage:
    """See the module's text. ``redis`` None: in memory."""

    def __init__(
        self,
        *,
        wall_clock: Callable[[], float],
        redis: RedisConnection | None = None,
        flush_interval: float = 1.0,
        days_kept: int = DAYS_KEPT,
        max_pairs_per_day: int = MAX_PAIRS_PER_DAY,
    ) -> None:
        self._wall_clock = wall_clock
        self.redis = redis
        self.flush_interval = flush_interval
        self.days_kept = days_kept
        self.max_pairs = max_pairs_per_day
        # in memory: the ledger itself; with Redis: what was not flushed yet
        self._days: Days = {}
        # a flush sent whose answer did not come: sent again as it is, under its number (Redis
        # adds a number once), before what was added since goes in the next
        self._unconfirmed: Days = {}
        self._flushes = 0  # the number of the last flush made
        self._flush = redis.script(_FLUSH) if redis is not None else None
        self._flushed_key = (
            redis.key("usage", "flushed", uuid.uuid4().hex) if redis is not None else ""
        )
        self._flusher: asyncio.Task[None] | None = None
        self._down = False

    # ------------------------------------------------------------------ the hot path

    def add(self, record: TaskRecord) -> None:
        """``registry.on_final``."""
        day = int(self._wall_clock() // DAY)
        pairs = self._days.get(day)
        if pairs is None:
            pairs = self._new_day(day)
        pair = (record.tenant, record.key_id or NO_KEY)
        entry = pairs.get(pair)
        if entry is None:
            if len(pairs) >= self.max_pairs:  # bounded: further keys counted together
                pair = (record.tenant, OTHER_KEY)
                entry = pairs.get(pair)
            if entry is None:
                entry = pairs[pair] = _Entry()
        entry.spend += record.cost
        entry.images += len(record.results)
        entry.tasks += 1

    def add_many(self, records: list[TaskRecord]) -> None:
        """``registry.on_final_batch``: :meth:`add` for each, the day and the map read once."""
        day = int(self._wall_clock() // DAY)
        pairs = self._days.get(day)
        if pairs is None:
            pairs = self._new_day(day)
        get = pairs.get
        for record in records:
            pair = (record.tenant, record.key_id or NO_KEY)
            entry = get(pair)
            if entry is None:
                if len(pairs) >= self.max_pairs:  # bounded: further keys counted together
                    pair = (record.tenant, OTHER_KEY)
                    entry = get(pair)
                if entry is None:
                    entry = pairs[pair] = _Entry()
            entry.spend += record.cost
            entry.images += len(record.results)
            entry.tasks += 1

    def _new_day(self, day: int) -> dict[tuple[str, str], _Entry]:
        oldest = day - self.days_kept + 1
        for old in [d for d in self._days if d < oldest]:
            del self._days[old]
        pairs: dict[tuple[str, str], _Entry] = {}
        if day >= oldest:
            self._days[day] = pairs
        return pairs

    # ------------------------------------------------------------------ reading

    def today(self) -> int:
        return int(self._wall_clock() // DAY)

    async def rows(self, first: int, last: int, tenant: str | None) -> list[UsageRow]:
        """Days ``first`` to ``last`` (days since 1970-01-01, both included), one tenant's or
        (None) everyone's, by day, tenant and key id. Raises StoreUnavailable with Redis away."""
        figures: Days = {}
        if self.redis is not None:
            figures = await self._read(first, last, tenant)
        for day, pairs in [*self._unconfirmed.items(), *self._days.items()]:
            if first <= day <= last:
                for (name, key), entry in pairs.items():
                    if tenant is None or name == tenant:
                        _merge(figures.setdefault(day, {}), (name, key), entry)
        return [
            UsageRow(day_text(day), name, key, round(e.spend, 10), e.images, e.tasks)
            for day in sorted(figures)
            for (name, key), e in sorted(figures[day].items())
        ]

    async def _read(self, first: int, last: int, tenant: str | None) -> Days:
        redis = self.redis
        assert redis is not None
        days = list(range(first, last + 1))

        async def read() -> list[Any]:
            pipe = redis.client.pipeline(transaction=False)
            for day in days:
                pipe.hgetall(self._key(day))
            return list(await pipe.execute())

        answers = await redis.call(read)
        figures: Days = {}
        for day, fields in zip(days, answers, strict=True):
            for field, value in fields.items():
                name, key, metric = _unfield(field)
                if tenant is not None and name != tenant:
                    continue
                entry = figures.setdefault(day, {}).setdefault((name, key), _Entry())
                if metric == "s":
                    entry.spend += float(value)
                elif metric == "i":
                    entry.images += int(value)
                else:
                    entry.tasks += int(value)
        return figures

    # ------------------------------------------------------------------ Redis

    def _key(self, day: int) -> str:
        assert self.redis is not None
        return self.redis.key("usage", day_text(day))

    def start(self) -> None:
        if self.redis is not None and self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever())

    async def close(self) -> None:
        """The last figures to Redis (one try), then no more flushes."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
            with contextlib.suppress(StoreUnavailable):
                await self.flush()
                await self.flush()  # what waited behind a flush sent again

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except StoreUnavailable as exc:
                if not self._down:
                    self._down = True
                    log.warning(
                        "usage not flushed: redis unavailable; kept for later", error=str(exc)
                    )
            except Exception:  # a loop that died would lose every figure from here on
                log.exception("usage flush failed")
            else:
                if self._down:
                    self._down = False
                    log.info("usage flushed again")

    async def flush(self) -> None:
        """What this replica's tasks added since the last flush, to Redis in one script, under
        a number it adds once: a flush whose answer was lost is sent again as it is, and
        counted once whether or not Redis had run it."""
        redis, script = self.redis, self._flush
        if redis is None or script is None:
            return
        if not self._unconfirmed:
            if not self._days:
                return
            self._unconfirmed, self._days = self._days, {}
            self._flushes += 1
        args: list[Any] = [self._flushes, self.days_kept * int(DAY)]
        for day, pairs in self._unconfirmed.items():
            key = self._key(day)
            for (name, key_id), e in pairs.items():
                field = f"{key_part(name)}:{key_id}:"
                if e.spend:
                    args += [key, field + "s", "f", repr(e.spend)]
                args += [key, field + "i", "i", e.images, key, field + "t", "i", e.tasks]
        keys = [self._flushed_key]
        await redis.call(lambda: script(keys=keys, args=args))
        self._unconfirmed = {}


# KEYS[1]: the number of this replica's last flush added; ARGV[1]: this flush's number,
# ARGV[2]: the figures' TTL (s), then (key, field, 'f' or 'i', amount) to add
_FLUSH = """
if tonumber(ARGV[1]) <= tonumber(redis.call('GET', KEYS[1]) or '0') then return 0 end
for i = 3, #ARGV, 4 do
  if ARGV[i + 2] == 'f' then
    redis.call('HINCRBYFLOAT', ARGV[i], ARGV[i + 1], ARGV[i + 3])
  else
    redis.call('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 3])
  end
  redis.call('EXPIRE', ARGV[i], ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def _merge(into: dict[tuple[str, str], _Entry], pair: tuple[str, str], entry: _Entry) -> None:
    target = into.get(pair)
    if target is None:
        target = into[pair] = _Entry()
    target.spend += entry.spend
    target.images += entry.images
    target.tasks += entry.tasks


def _unfield(field: bytes | str) -> tuple[str, str, str]:
    text = field.decode() if isinstance(field, bytes) else field
    name, key, metric = text.rsplit(":", 2)
    return name.replace("%3A", ":").replace("%25", "%"), key, metric


# ---------------------------------------------------------------------- the endpoint


def admin_digests(config: Config) -> frozenset[bytes]:
    """The SHA-256 of every admin key (``[admin] keys`` and ``key_sha256``, the console's;
    ``TENEBRA_ADMIN_KEY`` is one more of the keys), whichever list the console keeps them in."""
    admin = config.admin
    return frozenset(
        [hash_key(key) for key in admin.keys] + [bytes.fromhex(h) for h in admin.key_sha256]
    )


def _error(status: int, code: str, message: str, parameter: str | None = None) -> web.Response:
    item = ErrorItem(code=code, message=message, parameter=parameter)
    return web.Response(
        body=msgspec.json.encode({"errors": [item]}),
        status=status,
        content_type="application/json",
        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None,
    )


class UsageEndpoint:
    """``GET /v1/usage``. Keys are guarded per client address as on the other doors (the same
    :class:`AuthThrottle`): a refused address gets 429, a wrong key a 401 after the throttle's
    delay."""

    def __init__(
        self,
        usage: Usage,
        tenant_of: Callable[[str], str | None],
        admin: frozenset[bytes],
        throttle: AuthThrottle,
        addresses: ClientAddresses,
        audit: Audit | None = None,
    ) -> None:
        self.usage = usage
        self.tenant_of = tenant_of
        self.admin = admin
        self.throttle = throttle
        self.addresses = addresses
        self.audit = audit

    async def handle(self, request: web.Request) -> web.StreamResponse:
        address = self.addresses.of(request.remote, request.headers.get("X-Forwarded-For"))
        refused = self.throttle.refused(address)
        if refused:
            raise too_many_failures(refused)
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else None
        if not key:
            if self.audit is not None:
                self.audit.auth_failed(address, "missingApiKey", "usage")
            return _error(401, "missingApiKey", "Send an API key as Authorization: Bearer.")
        tenant: str | None = None
        if not _member(hash_key(key), self.admin):
            tenant = self.tenant_of(key)
            if tenant is None:
                delay = self.throttle.failed(address)
                if self.audit is not None:
                    self.audit.auth_failed(
                        address, "invalidApiKey", "usage", self.throttle.refused(address)
                    )
                await asyncio.sleep(delay)
                return _error(401, "invalidApiKey", "Invalid API key.", "apiKey")
        self.throttle.succeeded(address)
        span = self._range(request.query.get("from"), request.query.get("to"))
        if isinstance(span, web.Response):
            return span
        first, last = span
        try:
            rows = await self.usage.rows(first, last, tenant)
        except StoreUnavailable as exc:
            return _error(503, "serviceUnavailable", f"The usage store did not answer ({exc}).")
        totals: dict[str, dict[str, float]] = {}
        for row in rows:
            total = totals.setdefault(row.tenant, {"spend": 0.0, "images": 0, "tasks": 0})
            total["spend"] += row.spend
            total["images"] += row.images
            total["tasks"] += row.tasks
        for total in totals.values():
            total["spend"] = round(total["spend"], 10)
        body = {
            "from": day_text(first),
            "to": day_text(last),
            "tenant": tenant,  # None: every tenant (an admin key)
            "usage": rows,
            "totals": totals,
        }
        return web.Response(body=msgspec.json.encode(body), content_type="application/json")

    def _range(
        self, given_from: str | None, given_to: str | None
    ) -> tuple[int, int] | web.Response:
        today = self.usage.today()
        days: list[int] = []
        for name, text in (("from", given_from), ("to", given_to)):
            if text is None:
                days.append(today)
                continue
            try:
                days.append(parse_day(text))
            except ValueError:
                return _error(
                    400,
                    "invalidDate",
                    f"{name}: expected a date as YYYY-MM-DD, got {text!r}.",
                    name,
                )
        first, last = days
        if first > last:
            return _error(400, "invalidDate", f"from ({day_text(first)}) is after to "
                          f"({day_text(last)}).", "from")  # fmt: skip
        if last - first + 1 > MAX_RANGE_DAYS:
            return _error(
                400, "invalidDate",
                f"At most {MAX_RANGE_DAYS} days per request; asked for {last - first + 1}.",
                "to",
            )  # fmt: skip
        return first, last


def _member(digest: bytes, digests: frozenset[bytes]) -> bool:
    """Whether ``digest`` is an admin key's: each compared in constant time (a handful of admin
    keys, and one opens every tenant's figures)."""
    found = False
    for candidate in digests:
        found |= secrets.compare_digest(digest, candidate)
    return found
