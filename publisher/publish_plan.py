"""The publish plan: every decision a publish to Redis makes, with no I/O.

In the manner of h11, the plan decides and a driver does the I/O. A plan is a generator: it
yields a command (:class:`RunScripts`, :class:`LoadScript`, :class:`CountReplicas`,
:class:`Reconnect`, :class:`Sleep`, :class:`ReadClock`, :class:`Attempt`), the driver carries
it out and sends the result back, or throws in the exception it caught, and the plan ends by
returning the ids (or the clock) or by raising the final error. ``RedisTransport`` and
``AsyncRedisTransport`` are its two drivers, one blocking and one asyncio; all they know is how
to turn a command into a redis-py call.

What the plan decides: which errors are worth sending again (:func:`is_transient`), how long
to wait and when to give up (``retry_for``, read from a clock it is given), that a retry of an
unconfirmed publish asks for its first ids again (sticky ids), the replicas attached when a
``NotReplicated`` is final, loading the script after ``NOSCRIPT`` and re-running only the
publishes that did not run, and counting the replicas once per transport. This module also
holds the publisher's defaults for those settings.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeAlias, TypeVar

from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from publisher._retry import Backoff
from publisher.protocol import BEGINNING, DEFAULT_IDEMPOTENCY_TTL, Keys, Message, Retention, id_key

log = logging.getLogger("publisher")

# -- defaults -------------------------------------------------------------------------------

DEFAULT_RETRY_FOR = 10.0
"""Seconds a publisher keeps sending a publish again after transient errors."""
DEFAULT_WAIT_TIMEOUT = 1.0
"""Seconds a publish waits for its replicas (``WAIT``) before the attempt counts as failed."""

# -- failures -------------------------------------------------------------------------------

TRANSIENT_ERRORS = (
    ConnectionError, TimeoutError, BusyLoadingError, ReadOnlyError, TryAgainError, MasterDownError,
    OSError,
)  # fmt: skip
"""Errors after which the same publish may be sent again: its idempotency key makes that safe."""


def is_transient(exc: BaseException) -> bool:
    """Whether a publish that failed with ``exc`` may be sent again.

    ``NOREPLICAS`` (``min-replicas-to-write``) is a plain ``ResponseError`` in redis-py: the
    primary has lost its replicas, typically because one of them was just promoted."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith("NOREPLICAS")


class NotReplicated(ConnectionError):
    """``WAIT`` timed out: the publishes were stored and delivered on the primary, but fewer
    replicas than asked confirmed them, so a failover may lose them. Sent again with their
    idempotency keys, they return the same ids and wait for the replicas again."""

    def __init__(self, ids: list[str], replicas: int, wanted: int, attached: int | None = None):
        super().__init__(ids, replicas, wanted, attached)
        self.ids = ids
        self.replicas = replicas
        self.wanted = wanted
        self.attached = attached
        """Replicas attached to the primary when the publish gave up (None: not asked)."""

    def __str__(self) -> str:
        what = "the event was" if len(self.ids) == 1 else f"{len(self.ids)} events were"
        attached = "" if self.attached is None else f" ({self.attached} replicas attached)"
        return (
            f"{what} stored and delivered with id {', '.join(self.ids)}, but only "
            f"{self.replicas} of {self.wanted} replicas confirmed it in time{attached}: a "
            "failover may lose it. Publishing again with the same idempotency key returns the "
            "same id and waits for the replicas again."
        )


class Failure(StrEnum):
    """Why a publish failed in a way that sending it again cannot fix."""

    TOPIC_CONFLICT = "topic_storage_conflict"
    """A topic's stream key holds another type: an operator must repair or delete it."""
    STORAGE_FULL = "storage_full"
    """Redis refuses writes (``maxmemory`` reached): it needs memory freed, not a retry."""
    STORAGE_ERROR = "storage_error"
    """Anything else (a clock the script refuses, a script error): see the raw text."""


def permanent_failure(exc: BaseException) -> Failure | None:
    """What kind of permanent failure ``exc`` is, or None when sending again may succeed."""
    if is_transient(exc):
        return None
    if isinstance(exc, OutOfMemoryError) or str(exc).startswith("OOM"):
        return Failure.STORAGE_FULL
    text = str(exc)
    if text.startswith("WRONGTYPE") and text.endswith("not a stream"):
        return Failure.TOPIC_CONFLICT
    return Failure.STORAGE_ERROR


# -- what a command carries and what comes back ----------------------------------------------


def script_call(
    keys: Keys,
    retention: Retention,
    message: Message,
    idempotency_ttl: float,
    prior: str = "",
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of one run of the publish script."""
    script_keys = [
        keys.clock,
        keys.origin,
        keys.idempotency(message.idempotency_digest),
        *(keys.stream(t) for t in message.topics),
    ]
    args: list[Any] = [
        message.body,
        retention.max_events,
        int(retention.max_age * 1000),
        max(1, int(idempotency_ttl * 1000)) if message.remember else 0,
        prior,
        *(keys.channel(t) for t in message.topics),
    ]
    return script_keys, args


def clock_position(keys: Keys, value: bytes | str | None) -> str:
    """The clock key's id, or the beginning when nothing was published yet."""
    if value is None:
        return BEGINNING
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        id_key(text)
    except ValueError:
        raise ValueError(f"the clock key {keys.clock!r} holds {value[:40]!r}, not an id") from None
    return text


def attached_replicas(info: dict[str, Any]) -> int | None:
    """The replicas attached to a primary, from its ``INFO replication`` (None if unknown)."""
    value = info.get("connected_slaves")
    return int(value) if value is not None else None


def _decode(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _unloaded(results: list[Any]) -> list[int]:
    """Indexes of results that failed only because Redis did not have the script (so the
    script did not run, and sending them again publishes nothing twice); any other error
    among them is raised."""
    failed = []
    for index, result in enumerate(results):
        if isinstance(result, NoScriptError):
            failed.append(index)
        elif isinstance(result, Exception):
            raise result
    return failed


class Replication:
    """``WAIT numreplicas timeout`` at the end of each publish pipeline (same round trip), so
    a publish is acknowledged only once ``replicas`` replicas hold it."""

    def __init__(self, replicas: int, timeout: float) -> None:
        if replicas < 0:
            raise ValueError("wait_replicas must be >= 0")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError("wait_timeout must be a number of seconds > 0")
        self.replicas = replicas
        self.timeout_ms = max(1, int(timeout * 1000))
        self.checked = not replicas
        """Whether the attached replicas were counted (once, at the first publish)."""

    def check(self, attached: int | None) -> None:
        """Warn once when fewer replicas are attached than each publish waits for: every
        publish would then wait ``wait_timeout``, be retried and raise ``NotReplicated``."""
        if attached is None:
            return
        self.checked = True
        if attached < self.replicas:
            log.warning(
                "wait_replicas=%d, but the primary has %d replicas attached: publishes are "
                "stored and delivered, then raise NotReplicated after their retries",
                self.replicas, attached,
            )  # fmt: skip

    def split(self, results: list[Any]) -> tuple[list[Any], int]:
        """The scripts' results, and how many replicas confirmed them."""
        if not self.replicas:
            return results, 0
        confirmed = results.pop()
        if isinstance(confirmed, Exception):
            raise confirmed
        return results, int(confirmed)

    def confirm(self, ids: list[str], confirmed: int) -> list[str]:
        if confirmed < self.replicas:
            raise NotReplicated(ids, confirmed, self.replicas)
        return ids


# -- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunScripts:
    """One pipeline (``transaction=False``, ``raise_on_error=False``): ``EVALSHA`` of the
    publish script for each call, then ``WAIT wait_replicas wait_timeout_ms`` when
    ``wait_replicas`` is not 0. Result: the pipeline's raw results, errors included."""

    calls: tuple[tuple[list[str], list[Any]], ...]
    """Each run's keys and arguments (:func:`script_call`)."""
    wait_replicas: int = 0
    wait_timeout_ms: int = 0


@dataclass(frozen=True, slots=True)
class LoadScript:
    """``SCRIPT LOAD`` the publish script. Result: ignored."""


@dataclass(frozen=True, slots=True)
class CountReplicas:
    """``INFO replication``. Result: its reply, a mapping."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Drop the idle connections, so the next command connects again (under Sentinel, to
    wherever the primary is now). Result: ignored."""


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` before the next attempt. Result: ignored."""

    seconds: float


@dataclass(frozen=True, slots=True)
class ReadClock:
    """``GET key``. Result: the raw value (bytes, str or None)."""

    key: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of a publish: run :meth:`PublishPlan.attempt` for these messages and
    priors. Result: the ids. A command of its own so that a driver has one place where each
    attempt happens."""

    messages: tuple[Message, ...]
    priors: tuple[str, ...]
    """For each message, the id an earlier unconfirmed attempt gave it ("" if none)."""


Command: TypeAlias = (
    RunScripts | LoadScript | CountReplicas | Reconnect | Sleep | ReadClock | Attempt
)
_T = TypeVar("_T")
Plan: TypeAlias = Generator[Command, Any, _T]
"""Yields commands, is sent each command's result (``Any``: each command says what its result
is) or thrown the exception that carrying it out raised, and returns what the plan is for."""


@dataclass(frozen=True, slots=True)
class Done(Generic[_T]):
    """A plan's end: what it was for."""

    value: _T


def advance(
    plan: Plan[_T], result: Any = None, failure: Exception | None = None
) -> Command | Done[_T]:
    """Hand ``plan`` what its last command gave (its result, or the error carrying it out
    raised) and take its next command, or its end. The plan's own final error propagates.
    Start a plan with ``advance(plan)``; each driver is a loop around this."""
    try:
        return plan.send(result) if failure is None else plan.throw(failure)
    except StopIteration as done:
        return Done(done.value)


class PublishPlan:
    """The plans of one transport: :meth:`send`, :meth:`attempt` and :meth:`position`.

    It holds the transport's state (whether the replicas were counted), so a transport keeps
    one for its life."""

    def __init__(
        self,
        keys: Keys,
        retention: Retention,
        *,
        retry_for: float = DEFAULT_RETRY_FOR,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        wait_replicas: int = 0,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys
        self.retention = retention
        self.retry_for = retry_for
        self.idempotency_ttl = idempotency_ttl
        self.replication = Replication(wait_replicas, wait_timeout)
        self.clock = clock

    def send(self, messages: Sequence[Message]) -> Plan[list[str]]:
        """Publish ``messages``, retrying transient errors for ``retry_for`` seconds.

        Each retry reconnects, then waits. A retry after ``NotReplicated`` asks for the ids
        the unconfirmed attempt got (they may have been delivered live already, so the same
        ids keep a subscriber from seeing the event twice). The final ``NotReplicated`` says
        how many replicas were attached."""
        if not self.replication.checked:
            self.replication.check((yield from self._count_replicas()))
        backoff = Backoff(self.retry_for, self.clock)
        priors = ("",) * len(messages)
        while True:
            try:
                ids: list[str] = yield Attempt(tuple(messages), priors)
            except (*TRANSIENT_ERRORS, ResponseError) as exc:
                failure: Exception = exc
            else:
                return ids
            delay = backoff.next_delay() if is_transient(failure) else None
            if delay is None:
                if isinstance(failure, NotReplicated):
                    failure.attached = yield from self._count_replicas()
                raise failure
            if isinstance(failure, NotReplicated):
                priors = tuple(failure.ids)
            yield Reconnect()
            yield Sleep(delay)

    def attempt(self, messages: Sequence[Message], priors: Sequence[str]) -> Plan[list[str]]:
        """One round trip, or two after ``NOSCRIPT``: the script is then loaded and only the
        publishes it did not run are sent again (the others were stored; sending them again
        would be harmless but costs a round trip's worth of work)."""
        results, confirmed = self.replication.split((yield self._run(messages, priors)))
        if failed := _unloaded(results):
            yield LoadScript()
            rerun = self._run([messages[i] for i in failed], [priors[i] for i in failed])
            retried, confirmed = self.replication.split((yield rerun))
            for index, result in zip(failed, retried, strict=True):
                results[index] = result
            if _unloaded(results):
                raise NoScriptError("the publish script could not be loaded")
        return self.replication.confirm([_decode(v) for v in results], confirmed)

    def position(self) -> Plan[str]:
        """The clock (one ``GET``); transient errors are retried for ``retry_for`` seconds."""
        backoff = Backoff(self.retry_for, self.clock)
        while True:
            try:
                value = yield ReadClock(self.keys.clock)
            except TRANSIENT_ERRORS as exc:
                failure: Exception = exc
            else:
                return clock_position(self.keys, value)
            delay = backoff.next_delay()
            if delay is None:
                raise failure
            yield Reconnect()
            yield Sleep(delay)

    def _run(self, messages: Sequence[Message], priors: Sequence[str]) -> RunScripts:
        calls = tuple(
            script_call(self.keys, self.retention, message, self.idempotency_ttl, prior)
            for message, prior in zip(messages, priors, strict=True)
        )
        replication = self.replication
        return RunScripts(calls, replication.replicas, replication.timeout_ms)

    def _count_replicas(self) -> Plan[int | None]:
        """How many replicas the primary has now (None if it could not be asked)."""
        try:
            info = yield CountReplicas()
        except (RedisError, OSError):
            return None
        return attached_replicas(info)
