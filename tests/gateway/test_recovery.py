"""The no-double-billing rules as tables of event sequences, with no sockets: one test for each
row of the README's recovery table, and the ordering rules around them."""

from __future__ import annotations

import random

import pytest

from gateway.recovery import LinkRecovery, Verdict

A, B, C = "up-a", "up-b", "up-c"


def recovery(*sent: str) -> LinkRecovery:
    state = LinkRecovery(random.Random(3).shuffle)
    for upstream_uuid in sent:
        state.sent(upstream_uuid)
    return state


def test_resumed_buffered_or_running_tasks_are_rechecked_later_not_polled_now() -> None:
    """Rows 1-2: the provider holds what it acknowledged; its results come through the
    resumed session, so those tasks get one later recheck, not an urgent poll."""
    state = recovery(A, B)
    state.heard(A)
    plan = state.reconnected(resumed=True)
    assert plan.poll_now == [B]  # never acknowledged: its frame may have died
    assert plan.recheck_later == [A]
    assert state.orphans == set()


def test_recheck_skips_tasks_that_settled_meanwhile() -> None:
    state = recovery(A, B)
    state.heard(A)
    state.heard(B)
    plan = state.reconnected(resumed=True)
    state.settled(A)
    assert state.due_for_recheck(plan.recheck_later) == [B]


def test_resumed_task_not_found_is_sent_again() -> None:
    """Row 3: under a resumed session taskNotFound means the frame never arrived."""
    state = recovery(A)
    plan = state.reconnected(resumed=True)
    state.polled(A, sends=1)
    assert plan.poll_now == [A]
    assert state.not_found(A, sends=1, resend_queued=False) is Verdict.RESEND


def test_a_not_found_about_an_older_send_is_ignored() -> None:
    """Row 3: only an answer newer than the task's last send counts."""
    state = recovery(A)
    state.reconnected(resumed=True)
    state.polled(A, sends=1)
    state.sent(A)  # resent meanwhile (sends is now 2)
    assert state.not_found(A, sends=2, resend_queued=False) is Verdict.IGNORE


def test_a_not_found_while_a_resend_waits_is_ignored() -> None:
    state = recovery(A)
    state.reconnected(resumed=True)
    state.polled(A, sends=1)
    assert state.not_found(A, sends=1, resend_queued=True) is Verdict.IGNORE


def test_a_not_found_nobody_asked_for_is_ignored() -> None:
    state = recovery(A)
    state.reconnected(resumed=True)
    assert state.not_found(A, sends=1, resend_queued=False) is Verdict.IGNORE


def test_a_conflict_to_a_resend_proves_the_provider_had_it() -> None:
    """Row 3: the copy was refused, unbilled; the task is polled until it settles."""
    state = recovery(A)
    state.reconnected(resumed=True)
    state.polled(A, sends=1)
    assert state.not_found(A, sends=1, resend_queued=False) is Verdict.RESEND
    state.sent(A)
    assert state.conflict(A, sends=2) is Verdict.POLL
    assert state.orphans_due() == [A]


def test_a_conflict_to_a_first_send_is_the_tasks_own_error() -> None:
    state = recovery(A)
    assert state.conflict(A, sends=1) is Verdict.RELAY
    assert state.orphans == set()


def test_new_session_every_task_is_polled_now_and_until_it_settles() -> None:
    """Row 4: nothing will push results of a lost session to us: orphans, polled each round."""
    state = recovery(A, B)
    state.heard(A)
    plan = state.reconnected(resumed=False)
    assert sorted(plan.poll_now) == [A, B] and plan.recheck_later == []
    assert sorted(state.orphans_due()) == [A, B]
    state.settled(A)
    assert state.orphans_due() == [B]
    state.settled(B)
    assert state.orphans_due() == []


def test_new_session_task_not_found_fails_and_is_never_resent() -> None:
    """Row 5: a restarted provider may have billed what it forgot."""
    state = recovery(A)
    state.reconnected(resumed=False)
    state.polled(A, sends=1)
    assert state.not_found(A, sends=1, resend_queued=False) is Verdict.FAIL


def test_a_provider_that_never_answers_leaves_the_task_to_its_deadline() -> None:
    """Row 6: recovery itself never gives up on a task nor fails it without an answer; the
    registry's ``tasks.timeout`` does (tested in test_tasks)."""
    state = recovery(A)
    for _ in range(5):
        state.reconnected(resumed=False)
        state.polled(A, sends=1)
    assert state.in_flight == {A} and state.orphans_due() == [A]


@pytest.mark.parametrize("resumed", [True, False])
def test_settled_tasks_are_forgotten_entirely(resumed: bool) -> None:
    state = recovery(A, B, C)
    state.heard(A)
    state.reconnected(resumed=resumed)
    state.polled(B, sends=1)
    for upstream_uuid in (A, B, C):
        state.settled(upstream_uuid)
    assert state.in_flight == set() and state.orphans == set()
    assert state.not_found(B, sends=1, resend_queued=False) is Verdict.IGNORE
    assert state.reconnected(resumed=resumed).poll_now == []


def test_a_stray_item_is_not_remembered_as_an_acknowledgement() -> None:
    state = recovery(A)
    state.heard(B)  # never sent on this link
    state.sent(B)
    assert sorted(state.reconnected(resumed=True).poll_now) == [A, B]


def test_polls_come_in_a_fresh_order_each_round() -> None:
    """A link that keeps breaking must not starve the same tasks at the end of the list."""
    tasks = [f"up-{i:02d}" for i in range(20)]
    state = recovery(*tasks)
    orders = {tuple(state.reconnected(resumed=False).poll_now) for _ in range(5)}
    assert len(orders) > 1
    assert all(sorted(order) == tasks for order in orders)


def test_on_lost_resubmit_sends_a_lost_task_again_once_per_loss() -> None:
    """provider.on_lost = "resubmit": a task a restarted provider forgot goes again, once for
    that loss (answers about an older send are ignored); lost again in a later restart, it goes
    again. The README states the risk: a provider that billed what it forgot bills it twice."""
    state = LinkRecovery(random.Random(3).shuffle, resubmit_lost=True)
    state.sent(A)
    state.reconnected(resumed=False)
    state.polled(A, sends=1)
    assert state.not_found(A, sends=1, resend_queued=False) is Verdict.RESUBMIT
    assert state.orphans_due() == []  # the new session pushes its results as usual
    state.sent(A)  # sends = 2: a second answer to the first poll is about the old send
    assert state.not_found(A, sends=2, resend_queued=False) is Verdict.IGNORE
    state.reconnected(resumed=False)  # the provider restarts again
    state.polled(A, sends=2)
    assert state.not_found(A, sends=2, resend_queued=False) is Verdict.RESUBMIT
