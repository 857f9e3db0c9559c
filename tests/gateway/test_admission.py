"""Who goes next, with no sockets: the adaptive window's control law, and fair queueing."""

from __future__ import annotations

import pytest

from gateway.admission import FairQueue, QueueFull, TenantLimits, Window

# --------------------------------------------------------------------------- the window


def test_a_refusal_halves_the_window_once_per_congestion_event() -> None:
    window = Window(256)
    sent_epoch = window.epoch
    assert window.refused(sent_epoch) and window.limit == 128
    # more refusals of tasks sent before that decrease are the same event
    assert not window.refused(sent_epoch)
    assert window.limit == 128
    assert window.refused(window.epoch) and window.limit == 64


def test_success_grows_the_window_by_one_per_window_of_successes() -> None:
    window = Window(256)
    window.refused(window.epoch)
    window.refused(window.epoch)  # 64
    for _ in range(64):
        window.succeeded()
    assert 64.9 < window.size < 65
    window.succeeded()
    assert window.limit == 65


def test_the_window_stays_between_one_and_its_ceiling() -> None:
    window = Window(8)
    for _ in range(20):
        window.refused(window.epoch)
    assert window.limit == 1
    for _ in range(10_000):
        window.succeeded()
    assert window.limit == 8


@pytest.mark.parametrize("capacity", [3, 16, 100])
def test_the_window_converges_on_the_providers_capacity(capacity: int) -> None:
    """A provider that takes ``capacity`` tasks at once and refuses the rest: after a few
    rounds the window saw-tooths between half the capacity and a little above it (AIMD), and
    most tasks are accepted."""
    window = Window(256)
    limits: list[int] = []
    accepted = refused = 0
    for _ in range(400):  # rounds: send a window's worth, then all of them settle
        epoch = window.epoch
        sent = window.limit
        taken = min(sent, capacity)
        for _ in range(sent - taken):
            window.refused(epoch)
        for _ in range(taken):
            window.succeeded()
        accepted += taken
        refused += sent - taken
        limits.append(window.limit)
    settled = limits[100:]
    assert min(settled) >= capacity // 2
    assert max(settled) <= capacity + 1
    assert accepted >= 0.7 * 400 * capacity  # the provider is kept busy
    assert refused < accepted / (1 if capacity < 10 else 10)  # tiny windows saw-tooth fast


# --------------------------------------------------------------------------- fair queueing


def drain(queue: FairQueue[str], count: int) -> list[str]:
    taken = []
    for _ in range(count):
        popped = queue.pop()
        assert popped is not None
        tenant, item = popped
        queue.finished(tenant)
        taken.append(item)
    return taken


def test_within_a_tenant_tasks_go_in_arrival_order() -> None:
    queue: FairQueue[str] = FairQueue(100)
    for i in range(5):
        queue.push("a", f"a{i}")
    assert drain(queue, 5) == ["a0", "a1", "a2", "a3", "a4"]
    assert queue.pop() is None and len(queue) == 0


@pytest.mark.parametrize("quantum", [1, 8])
def test_a_newcomer_never_waits_behind_anothers_backlog(quantum: int) -> None:
    """Tenant A queues 3,000 tasks; B then sends 20 one by one: each B task goes within one of
    A's runs (``quantum`` tasks), never behind A's backlog, and A's all go too, in order."""
    queue: FairQueue[str] = FairQueue(10_000, quantum=quantum)
    for i in range(3000):
        queue.push("a", f"a{i}")
    taken = drain(queue, 500)
    waits = []
    for i in range(20):
        queue.push("b", f"b{i}")
        turn = drain(queue, quantum + 1)
        waits.append(turn.index(f"b{i}"))
        taken.extend(turn)
    assert max(waits) <= quantum
    taken.extend(drain(queue, len(queue)))
    a_order = [item for item in taken if item.startswith("a")]
    assert a_order == [f"a{i}" for i in range(3000)]  # all of A's, in arrival order
    assert len(queue) == 0


def test_a_tenant_is_served_in_runs_of_the_quantum() -> None:
    """A client's frame of tasks goes out together (its results come back together and are
    written to its socket in one go), while tenants still alternate run by run."""
    queue: FairQueue[str] = FairQueue(100, quantum=3)
    for i in range(6):
        queue.push("a", f"a{i}")
        queue.push("b", f"b{i}")
    assert drain(queue, 12) == [
        "a0", "a1", "a2", "b0", "b1", "b2", "a3", "a4", "a5", "b3", "b4", "b5",
    ]  # fmt: skip


def test_weights_share_the_provider_in_proportion() -> None:
    weights = {"a": 1.0, "b": 3.0}
    queue: FairQueue[str] = FairQueue(10_000, lambda name: TenantLimits(weight=weights[name]))
    for i in range(400):
        queue.push("a", f"a{i}")
        queue.push("b", f"b{i}")
    taken = drain(queue, 400)
    share_b = sum(item.startswith("b") for item in taken) / len(taken)
    assert share_b == pytest.approx(0.75, abs=0.02)


def test_a_tenant_at_its_in_flight_cap_is_passed_over_until_one_ends() -> None:
    caps = {"a": TenantLimits(max_in_flight=2), "b": TenantLimits()}
    queue: FairQueue[str] = FairQueue(100, caps.__getitem__)
    for i in range(4):
        queue.push("a", f"a{i}")
    queue.push("b", "b0")
    first = [queue.pop(), queue.pop(), queue.pop()]
    assert [item for _, item in filter(None, first)] == ["a0", "a1", "b0"]  # a's run, capped
    assert queue.pop() is None  # a is at 2 in flight, b has nothing waiting
    assert queue.in_flight("a") == 2 and queue.waiting("a") == 2
    queue.finished("a")
    assert queue.pop() == ("a", "a2")


def test_queue_bounds_per_tenant_and_in_total() -> None:
    caps = {"a": TenantLimits(max_queued=2), "b": TenantLimits()}
    queue: FairQueue[str] = FairQueue(3, caps.__getitem__)
    queue.push("a", "a0")
    queue.push("a", "a1")
    with pytest.raises(QueueFull) as tenant_full:
        queue.push("a", "a2")
    assert tenant_full.value.tenant_limit
    queue.push("b", "b0")
    with pytest.raises(QueueFull) as gateway_full:
        queue.push("b", "b1")
    assert not gateway_full.value.tenant_limit
    # a task that was out and comes back is never refused
    queue.push_front("a", "a-back")
    assert len(queue) == 4
    assert queue.pop() == ("a", "a-back")


def test_expiry_takes_only_from_the_front_of_each_line() -> None:
    queue: FairQueue[int] = FairQueue(100)
    for i in range(10):
        queue.push("a" if i % 2 else "b", i)
    seen: list[int] = []

    def old(item: int) -> bool:
        seen.append(item)
        return item < 4

    assert sorted(queue.expire(old)) == [0, 1, 2, 3]
    assert len(seen) == 6  # four taken, and one look at each line's new front
    assert len(queue) == 6


def test_reconfigure_applies_new_limits() -> None:
    limits = {"a": TenantLimits(max_in_flight=1)}
    queue: FairQueue[str] = FairQueue(100, limits.__getitem__)
    queue.push("a", "a0")
    queue.push("a", "a1")
    assert queue.pop() == ("a", "a0")
    assert queue.pop() is None
    limits["a"] = TenantLimits(max_in_flight=5)
    queue.reconfigure()
    assert queue.pop() == ("a", "a1")
