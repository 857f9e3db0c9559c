"""After a provider link breaks: what becomes of each task it had out, so that none is lost and
none is billed twice. Pure: events in, verdicts out, no sockets, no clock; the link
(:mod:`gateway.upstream`) carries the verdicts out.

The rules (one row each in the README's recovery table, one test each):

- Resumed session: the provider still holds every task it received. A task it never
  acknowledged is polled at once (its frame may have died with the old socket); the others
  get one later recheck, in case a result frame died in the break. ``taskNotFound`` then means
  the frame never arrived: the task is sent again (billed once).
- New session: the provider forgot our old session (a restart). Every task out is polled now
  and, as nothing will push its results to us any more, again every interval until it settles
  (an orphan). ``taskNotFound`` means it may have been received and billed, then forgotten:
  the task fails, never sent twice; unless ``provider.on_lost = "resubmit"`` says to send it
  again, once per loss, at the risk of a second bill.
- Only an answer newer than the task's last send counts: a poll remembers the send count it
  was asked at, and a ``taskNotFound`` about an earlier send is ignored.
- ``conflictTaskUUID`` in answer to a resend proves the provider had the task after all (its
  first frame was still being read when it answered ``taskNotFound``): the copy was refused,
  unbilled, and the task is polled until it settles.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LinkRecovery", "Reconnected", "Verdict"]


class Verdict(enum.Enum):
    RESEND = "resend"  # it never reached the provider: send it again
    FAIL = "fail"  # the provider forgot it and may have billed it: fail, never send again
    IGNORE = "ignore"  # an answer about an older send, or a resend already on its way
    POLL = "poll"  # the provider has it: poll until it settles
    RESUBMIT = "resubmit"  # lost with the provider's session: sent again (provider.on_lost)
    RELAY = "relay"  # an ordinary answer about the task: the registry takes it


@dataclass(frozen=True)
class Reconnected:
    poll_now: list[str]
    recheck_later: list[str]


class LinkRecovery:
    """The recovery state of one provider link, by the gateway's upstream UUIDs."""

    def __init__(
        self, shuffle: Callable[[list[str]], None], *, resubmit_lost: bool = False
    ) -> None:
        # A fresh order every round: answers come back in order, and a link that keeps
        # breaking must not starve the same tasks at the end of the list every time.
        self._shuffle = shuffle
        self.in_flight: set[str] = set()  # sent on this link and not final
        self.orphans: set[str] = set()  # their session is gone: polled until they settle
        self.resumed = False  # did the current connection resume the provider session?
        # the task's send count when a poll about it went out
        self._polled_at: dict[str, int] = {}
        # acknowledged (any item about them) since their last send
        self._heard: set[str] = set()
        # provider.on_lost = "resubmit": a task lost with a provider session is sent again, once
        # per loss, at the risk of a second bill if the provider billed what it then forgot
        self._resubmit_lost = resubmit_lost

    def sent(self, upstream_uuid: str) -> None:
        self.in_flight.add(upstream_uuid)
        self._heard.discard(upstream_uuid)

    def heard(self, upstream_uuid: str) -> None:
        if upstream_uuid in self.in_flight:  # a stray item must not be remembered
            self._heard.add(upstream_uuid)

    def settled(self, upstream_uuid: str) -> None:
        self.in_flight.discard(upstream_uuid)
        self.orphans.discard(upstream_uuid)
        self._polled_at.pop(upstream_uuid, None)
        self._heard.discard(upstream_uuid)

    def reconnected(self, resumed: bool) -> Reconnected:
        """The link is authenticated again: which tasks to poll now, and which later.

        Polling everything at once under a resumed session would make recovery traffic grow
        with the load, and a link that breaks under traffic would never get through it."""
        self.resumed = resumed
        if not resumed:
            self.orphans |= self.in_flight
            return Reconnected(self._ordered(self.in_flight), [])
        return Reconnected(
            self._ordered(self.in_flight - self._heard), sorted(self.in_flight & self._heard)
        )

    def due_for_recheck(self, upstream_uuids: list[str]) -> list[str]:
        return self._ordered({u for u in upstream_uuids if u in self.in_flight})

    def orphans_due(self) -> list[str]:
        return self._ordered(self.orphans)

    def polled(self, upstream_uuid: str, sends: int) -> None:
        self._polled_at[upstream_uuid] = sends

    def not_found(self, upstream_uuid: str, *, sends: int, resend_queued: bool) -> Verdict:
        """The provider answered a poll about an open task with ``taskNotFound``."""
        asked_at = self._polled_at.get(upstream_uuid)
        if asked_at is None or sends > asked_at or resend_queued:
            return Verdict.IGNORE
        if self.resumed:
            return Verdict.RESEND
        if self._resubmit_lost:
            self.orphans.discard(upstream_uuid)  # its new send is pushed to us as usual
            return Verdict.RESUBMIT
        return Verdict.FAIL

    def conflict(self, upstream_uuid: str, *, sends: int) -> Verdict:
        """The provider answered a task with ``conflictTaskUUID``."""
        if sends < 2:
            return Verdict.RELAY  # a first send: the conflict is the task's own error
        self.orphans.add(upstream_uuid)
        return Verdict.POLL

    def _ordered(self, upstream_uuids: set[str]) -> list[str]:
        ordered = sorted(upstream_uuids)
        self._shuffle(ordered)
        return ordered
