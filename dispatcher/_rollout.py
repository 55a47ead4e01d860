"""Safe rollout and shadow traffic of one method between two versions (``rollouts:``).

The route table asks a method's ``Rollout`` or ``Shadow`` for the route of each call that
names no exact version (``None``, or a range both versions satisfy); calls naming a
version go where they say. Both are plain objects on the event loop's thread, so the
split is a counter and two integer divisions: no lock, no random draw, and exactly
``percent`` of every 100 calls go to the new version.

A call carrying an idempotency key is split by its key instead (a stable hash: the same
on every replica), so the key's repeats go where its first call went; as the rollout
advances a key only ever moves to the new version. A keyed call goes through the
idempotency step in front of the rollout's wrapping, answered from a record at either
version: a repeat meeting the key's record replays it wherever the split now sends it (a
step later, or after a rollback), and never runs again or is refused for the version.

A job is placed by the same split when it is submitted, by its idempotency key or else its
own id (``split_key``, kept in its record), and placed again by it at each attempt: its
attempts are measured like calls, and a job the new version had not run yet when the
rollout rolled back runs at the old one (its record says where it ran).

A ``Rollout`` is a small state machine evaluated on the call path, not by a timer task:
the first call after ``interval_s`` ends the window (no calls, no evidence, no step).

- ``running``: the new version's failures are counted per window; once they exceed
  ``max_error_rate`` of ``max(calls, min_calls)`` it rolls back at once (so at most one
  failed call past the budget). At the window's end it advances to the next step if the
  new version answered at least ``min_calls`` calls and their p99 is within
  ``max_p99_ms``; with fewer calls the window is extended; a p99 over budget rolls back.
- ``completed`` (100 %), ``rolled_back`` and ``aborted`` (0 %) are final until ``resume``
  (which starts again at the first step); ``paused`` holds the current percentage and
  still rolls back on failures.

Failures that count are the ones the new version (its code, its target) is to blame for:
``ROLLBACK_ERROR_TYPES``. A caller's bad params, our own limits and refusals do not.

A ``Shadow`` returns the primary's answer untouched; after it, the chosen share of calls
is sent again to the shadow version in a task this runtime owns (at most
``max_in_flight`` at once, else skipped), and the two answers compared. Its last few
differences say when, which request, what kind (``result_differs``, ``shadow_failed``
with the error's type) and how long each side took, never a value: its stats are shown
to every caller who may call the method, and a call's params and results are its
caller's alone. The two answers of a difference go to the log, at DEBUG. A reload that
retires the shadow version waits for the mirrors running (``RolloutRuntime.mirrors``) as
for calls: detached under a mirror, the version would be charged with a failure of the
reload's. A shadow a reload replaces or ends starts no more mirrors (``Shadow.ended``):
a call routed to it before that reload's swap and answered after it is not mirrored,
for its shadow version may be on its way out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from dispatcher._routes import Route, RouteTable
from dispatcher._versions import highest_in_range
from dispatcher.config.rollouts import RolloutSpec
from linchkit_plugin.errors import DispatchError, InvalidParams, MethodNotFound
from providers.invocation import Invocation, new_request_id

__all__ = [
    "ROLLBACK_ERROR_TYPES",
    "Rollout",
    "RolloutEvent",
    "RolloutListener",
    "RolloutRuntime",
    "Shadow",
    "shown_to",
]

log = logging.getLogger("dispatcher.rollout")

#: The error ``type``s that count against a new version: its code failed, its target is
#: down, slow or broken, or its breaker opened. Not counted: invalid params, access
#: refusals, our own rate limits and bulkheads (the old version would meet them too).
ROLLBACK_ERROR_TYPES = frozenset(
    {
        "plugin_error",
        "provider_error",
        "target_unavailable",
        "deadline_exceeded",
        "circuit_open",
        "method_not_found",
    }
)

#: Latencies kept per window for its p99: enough for 1 % to be 10 calls.
_LATENCY_SAMPLES = 1000
#: Differences a shadow keeps to show (no values: ``Shadow._remember``): enough to see a
#: pattern.
_RECENT_DIFFERENCES = 5
#: How much of each answer a DEBUG line of a difference shows.
_LOGGED_CHARS = 200

Status = Literal["running", "paused", "completed", "rolled_back", "aborted"]
Action = Literal["pause", "resume", "abort"]
Invoke = Callable[[Invocation], Awaitable[Any]]
#: The shadow calls running, each with the plugin versions it may reach (``Route.reaches``).
Mirrors = dict[asyncio.Task[None], frozenset[str] | None]


@dataclass(frozen=True, slots=True)
class RolloutEvent:
    """What happened to a rollout: ``advanced``, ``completed``, ``rolled_back``,
    ``paused``, ``resumed`` or ``aborted``."""

    plugin: str
    method: str
    from_version: str
    to_version: str
    kind: str
    percent: float
    reason: str


class RolloutListener(Protocol):
    def __call__(self, event: RolloutEvent) -> None: ...


def _split_due(count: int, percent: float) -> bool:
    """Whether call number ``count`` is one of the ``percent`` in each 100: spread evenly."""
    return int(count * percent / 100) > int((count - 1) * percent / 100)


def _key_share(name: str, idempotency_key: object) -> float:
    """Where ``idempotency_key`` falls in [0, 100) for the rollout ``name``: a key under
    the percentage goes to the new version. The same on every replica and every run
    (``hash`` is seeded per process), and independent between methods."""
    text = f"{name}\0{idempotency_key}".encode("utf-8", "surrogatepass")
    number = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")
    return number % 10_000 / 100


def _p99(latencies: deque[float]) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(len(ordered) * 0.99) - 1)]


class _Covers:
    """Which version ranges both versions of a rollout satisfy (remembered, bounded)."""

    def __init__(self, versions: tuple[str, str]) -> None:
        self._versions = versions
        self._known: dict[str, bool] = {}

    def __call__(self, wanted: str) -> bool:
        known = self._known.get(wanted)
        if known is None:
            if len(self._known) >= 256:
                self._known.clear()
            try:
                known = all(highest_in_range([each], wanted) for each in self._versions)
            except InvalidParams:
                known = False  # the route table reports the malformed range
            self._known[wanted] = known
        return known


class Rollout:
    """The traffic split of one method between ``from`` and ``to``, and its budget."""

    def __init__(
        self, spec: RolloutSpec, clock: Callable[[], float], notify: RolloutListener
    ) -> None:
        assert spec.to is not None
        self.spec = spec
        self.to_version = spec.to
        self._clock = clock
        self._notify = notify
        self._covers = _Covers((spec.from_version, spec.to))
        self.status: Status = "running"
        self.step = 0
        self.percent = spec.steps[0]
        self.rollbacks = 0
        self.reason = ""
        self._count = 0
        self._old: Route | None = None
        self._new: Route | None = None
        self.calls = {"from": 0, "to": 0}
        self.errors = {"from": 0, "to": 0}
        self._start_window()

    def _start_window(self) -> None:
        self._window_end = self._clock() + self.spec.interval_s
        self._window_calls = 0
        self._window_errors = 0
        self._latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)

    def bind(self, old: Route, new: Route) -> None:
        """Use the routes of the table now being built (a reload rebuilds them). A keyed
        call on either side is answered from its key's record at either version."""
        self._old = old.with_invoke(self._measured(old.invoke, "from"), (new.version,))
        self._new = new.with_invoke(self._measured(new.invoke, "to"), (old.version,))

    def covers(self, wanted: str) -> bool:
        return self._covers(wanted)

    def moves(self, version: str) -> bool:
        return version == self.spec.from_version or version == self.to_version

    def pick(self, idempotency_key: str | None = None) -> Route:
        assert self._old is not None
        assert self._new is not None
        if self.status == "running" and self._clock() >= self._window_end:
            self._end_window()
        percent = self.percent
        if percent <= 0:
            return self._old
        if percent >= 100:
            return self._new
        if idempotency_key is not None:
            return self._new if _key_share(self.spec.name, idempotency_key) < percent else self._old
        self._count = count = self._count + 1
        return self._new if _split_due(count, percent) else self._old

    def _measured(self, invoke: Invoke, side: Literal["from", "to"]) -> Invoke:
        clock = self._clock

        async def measured(invocation: Invocation) -> Any:
            started = clock()
            try:
                result = await invoke(invocation)
            except DispatchError as error:
                self._outcome(side, clock() - started, error.type in ROLLBACK_ERROR_TYPES)
                raise
            self._outcome(side, clock() - started, False)
            return result

        return measured

    def _outcome(self, side: Literal["from", "to"], seconds: float, failed: bool) -> None:
        self.calls[side] += 1
        self.errors[side] += failed
        if side == "from" or self.status not in ("running", "paused"):
            return
        self._window_calls += 1
        self._window_errors += failed
        self._latencies.append(seconds)
        spec = self.spec
        if failed and self._window_errors > spec.max_error_rate * max(
            self._window_calls, spec.min_calls
        ):
            self._roll_back(
                f"{self._window_errors} of {self._window_calls} calls to {self.to_version}"
                f" failed, over the budget of {spec.max_error_rate:.2%}"
            )

    def _end_window(self) -> None:
        spec = self.spec
        p99 = _p99(self._latencies)
        if spec.max_p99_ms is not None and p99 is not None and p99 * 1000 > spec.max_p99_ms:
            self._roll_back(
                f"p99 of {self.to_version} was {p99 * 1000:.0f} ms, over {spec.max_p99_ms:g} ms"
            )
            return
        if self._window_calls < spec.min_calls:  # too little evidence: hold the step longer
            self._window_end = self._clock() + spec.interval_s
            return
        self.step += 1
        self.percent = spec.steps[self.step]
        self._start_window()
        if self.percent >= 100:
            self.status = "completed"
            self._event("completed", f"all calls go to {self.to_version}", logging.INFO)
        else:
            self._event("advanced", f"{self.percent:g} % of calls go to {self.to_version}")

    def _roll_back(self, reason: str) -> None:
        self.status = "rolled_back"
        self.percent = 0
        self.rollbacks += 1
        self._event("rolled_back", reason, logging.WARNING)

    def control(self, action: Action) -> None:
        if action == "pause" and self.status == "running":
            self.status = "paused"
        elif action == "resume" and self.status == "paused":
            self.status = "running"
            self._start_window()
        elif action == "resume" and self.status in ("rolled_back", "aborted"):
            self.status = "running"
            self.step = 0
            self.percent = self.spec.steps[0]
            self._start_window()
        elif action == "abort" and self.status != "aborted":
            self.status = "aborted"
            self.percent = 0
        else:
            return
        self._event({"pause": "paused", "resume": "resumed", "abort": "aborted"}[action], "asked")

    def _event(self, kind: str, reason: str, level: int = logging.INFO) -> None:
        self.reason = reason
        log.log(level, "rollout of %s %s: %s", self.spec.name, kind.replace("_", " "), reason)
        spec = self.spec
        self._notify(
            RolloutEvent(
                spec.plugin,
                spec.method,
                spec.from_version,
                self.to_version,
                kind,
                self.percent,
                reason,
            )
        )

    def stats(self) -> dict[str, Any]:
        spec = self.spec
        p99 = _p99(self._latencies)
        return {
            "kind": "rollout",
            "plugin": spec.plugin,
            "method": spec.method,
            "from": spec.from_version,
            "to": self.to_version,
            "status": self.status,
            "step": self.step,
            "percent": self.percent,
            "reason": self.reason,
            "rollbacks": self.rollbacks,
            "calls": dict(self.calls),
            "errors": dict(self.errors),
            "window": {
                "calls": self._window_calls,
                "errors": self._window_errors,
                "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            },
        }

    def __repr__(self) -> str:
        return f"<Rollout {self.spec.name} {self.spec.from_version}→{self.to_version} {self.status} {self.percent:g}%>"


class Shadow:
    """Calls go to ``from``; a share of them is mirrored to the shadow version and compared."""

    def __init__(self, spec: RolloutSpec, clock: Callable[[], float], tasks: Mirrors) -> None:
        assert spec.shadow is not None
        self.spec = spec
        self.shadow = spec.shadow
        self._clock = clock
        self._tasks = tasks
        self._covers = _Covers((spec.from_version, spec.shadow.version))
        self._count = 0
        self._in_flight = 0
        #: A reload replaced or ended this shadow: the calls routed to it before start no
        #: more mirrors, whose version that reload may be detaching (it waits only for the
        #: mirrors running at its swap, and the calls to the primary do not hold it up).
        self.ended = False
        self._primary: Route | None = None
        self._other: Route | None = None
        self.counts = {"mirrored": 0, "equal": 0, "different": 0, "failed": 0, "skipped": 0}
        self.recent: deque[dict[str, Any]] = deque(maxlen=_RECENT_DIFFERENCES)

    def bind(self, primary: Route, other: Route) -> None:
        self._other = other
        self._primary = primary.with_invoke(self._mirrored(primary.invoke))

    def covers(self, wanted: str) -> bool:
        return self._covers(wanted)

    def moves(self, version: str) -> bool:
        return False  # every call is the primary's; the mirror is a copy

    def pick(self, idempotency_key: str | None = None) -> Route:
        assert self._primary is not None
        return self._primary

    def _mirrored(self, invoke: Invoke) -> Invoke:
        clock = self._clock

        async def mirrored(invocation: Invocation) -> Any:
            started = clock()
            result = await invoke(invocation)  # a failed primary has nothing to compare
            self._count = count = self._count + 1
            if _split_due(count, self.shadow.percent):
                self._mirror(invocation, result, clock() - started)
            return result

        return mirrored

    def _mirror(self, invocation: Invocation, result: Any, seconds: float) -> None:
        if self.ended:  # a call routed before a reload that took this shadow away
            return
        if self._in_flight >= self.shadow.max_in_flight:
            self.counts["skipped"] += 1
            return
        self._in_flight += 1
        self.counts["mirrored"] += 1
        task = asyncio.get_running_loop().create_task(self._compare(invocation, result, seconds))
        assert self._other is not None
        self._tasks[task] = self._other.reaches
        task.add_done_callback(self._tasks.pop)

    async def _compare(self, invocation: Invocation, expected: Any, primary_seconds: float) -> None:
        other = self._other
        assert other is not None
        started = self._clock()
        mirrored = dataclasses.replace(
            invocation,
            version=other.version,
            deadline=started + other.timeout,
            request_id=new_request_id(),
            idempotency_key=None,
        )
        try:
            answer = await other.invoke(mirrored)
        except DispatchError as error:
            self.counts["failed"] += 1
            self._remember(
                invocation, primary_seconds, self._clock() - started, expected, error, error.type
            )
            return
        except Exception:  # a shadow's bug must never reach anyone; say so in the log
            self.counts["failed"] += 1
            log.exception("shadow call of %s@%s failed", self.spec.name, other.version)
            return
        finally:
            self._in_flight -= 1
        if answer == expected:
            self.counts["equal"] += 1
        else:
            self.counts["different"] += 1
            self._remember(invocation, primary_seconds, self._clock() - started, expected, answer)

    def _remember(
        self,
        invocation: Invocation,
        primary_seconds: float,
        shadow_seconds: float,
        expected: Any,
        answer: Any,
        error: str | None = None,
    ) -> None:
        """Keep what an operator judges a shadow by, and no value: these stats are shown
        to every caller who may call the method (``GET /v1/rollouts``), and a result or
        an error's message (which often quotes the params) belongs to the one caller whose
        call it was. The request id lets the operator find the call in the log."""
        difference: dict[str, Any] = {
            "time": round(time.time(), 3),
            "request_id": invocation.request_id,
            # Whose call it was: the gateway shows a request id (a caller may choose its
            # own, and write anything in it) to that caller only, as /v1/errors does.
            "caller": invocation.caller,
            "kind": "result_differs" if error is None else "shadow_failed",
            "primary_ms": round(primary_seconds * 1000, 3),
            "shadow_ms": round(shadow_seconds * 1000, 3),
        }
        if error is not None:
            difference["error"] = error
        self.recent.append(difference)
        # The values themselves go to the log, read by whoever runs the dispatcher, not by
        # its callers; at DEBUG, so they are written only while an operator looks into a
        # shadow (level of ``dispatcher.rollout``), not kept by default: results may hold
        # personal data. Params are never written, as in the audit log without
        # ``audit_params``.
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "shadow of %s: %s for request %s: primary %s, shadow %s",
                self.spec.name,
                difference["kind"].replace("_", " "),
                invocation.request_id,
                repr(expected)[:_LOGGED_CHARS],
                repr(answer)[:_LOGGED_CHARS],
            )

    def control(self, action: Action) -> None:
        raise InvalidParams(f"{self.spec.name} is a shadow: {action} applies to rollouts only")

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "shadow",
            "plugin": self.spec.plugin,
            "method": self.spec.method,
            "from": self.spec.from_version,
            "to": self.shadow.version,
            "percent": self.shadow.percent,
            "in_flight": self._in_flight,
            **self.counts,
            "recent_differences": list(self.recent),
        }

    def __repr__(self) -> str:
        return f"<Shadow {self.spec.name} {self.spec.from_version}→{self.shadow.version} {self.counts}>"


class RolloutRuntime:
    """The dispatcher's rollouts and shadows, their listeners and the shadow tasks it owns."""

    def __init__(self, clock: Callable[[], float]) -> None:
        #: The dispatcher sets its loop's clock at start, before any rollout is made.
        self.clock = clock
        self.listeners: list[RolloutListener] = []
        self._controllers: dict[str, Rollout | Shadow] = {}
        self._tasks: Mirrors = {}

    def configure(self, specs: list[RolloutSpec], routes: RouteTable) -> None:
        """Install ``specs`` on ``routes`` (a table about to be used): an unchanged rollout
        keeps its step and counters, others start at their first step."""
        controllers: dict[str, Rollout | Shadow] = {}
        for spec in specs:
            controller = self._controllers.get(spec.name)
            if controller is None or controller.spec != spec:
                controller = (
                    Shadow(spec, self.clock, self._tasks)
                    if spec.shadow is not None
                    else Rollout(spec, self.clock, self._notify)
                )
            controller.bind(
                routes.routes_of(spec.plugin, spec.from_version)[spec.method],
                routes.routes_of(spec.plugin, spec.other)[spec.method],
            )
            routes.split(spec.plugin, spec.method, controller)
            controllers[spec.name] = controller
        for name, replaced in self._controllers.items():
            if isinstance(replaced, Shadow) and controllers.get(name) is not replaced:
                replaced.ended = True
        self._controllers = controllers

    def _notify(self, event: RolloutEvent) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("a rollout listener failed on %s", event.kind)

    def control(self, plugin: str, method: str, action: str) -> dict[str, Any]:
        controller = self._controllers.get(f"{plugin}.{method}")
        if controller is None:
            raise MethodNotFound(f"no rollout of {plugin}.{method}; see GET /v1/rollouts")
        if action not in ("pause", "resume", "abort"):
            raise InvalidParams(f"unknown rollout action {action!r:.40}: pause, resume or abort")
        controller.control(action)  # type: ignore[arg-type]
        return controller.stats()

    def stats(self) -> dict[str, Any]:
        return {name: each.stats() for name, each in self._controllers.items()}

    def mirrors(self, versions: frozenset[str] | None) -> list[asyncio.Task[None]]:
        """The shadow calls running now that may reach one of ``versions`` (plugin keys;
        None: any): a reload retiring those versions waits for them, as for calls."""
        return [
            task
            for task, reaches in self._tasks.items()
            if reaches is None or versions is None or not reaches.isdisjoint(versions)
        ]

    async def aclose(self) -> None:
        """Cancel the shadow calls still running (their callers were answered long ago)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def shown_to(rollout: dict[str, Any], caller: str | None) -> dict[str, Any]:
    """A rollout's or shadow's stats (``stats()["rollouts"]``'s) as ``caller`` is shown
    them (``GET /v1/rollouts``): a shadow's recent differences without whose call each
    was, and with the request id of the caller's own calls only (another caller's id may
    be one it chose, and say anything)."""
    recent = rollout.get("recent_differences")
    if not recent:
        return rollout
    shown = []
    for difference in recent:
        own = difference.get("caller") == caller
        shown.append(
            {
                name: value
                for name, value in difference.items()
                if name != "caller" and (own or name != "request_id")
            }
        )
    return {**rollout, "recent_differences": shown}
