"""The publish plan, command by command: what a publish to Redis asks for, and what it decides
from each answer. No Redis and no sockets: a scripted Redis answers the commands, and a fake
clock, moved on by each ``Sleep``, decides when ``retry_for`` is spent.

The real transports carry out the same commands against a real Redis in test_publisher.py,
test_replication.py, test_idempotency.py and test_publish_script.py."""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from redis.exceptions import ConnectionError, NoScriptError, RedisError, ResponseError, TimeoutError

from publisher.protocol import Keys, Message, Retention, make_message
from publisher.publish_plan import (
    Attempt,
    Command,
    CountReplicas,
    Done,
    NotReplicated,
    Plan,
    PublishPlan,
    ReadClock,
    Reconnect,
    RunScripts,
    Sleep,
    advance,
    script_call,
)

_T = TypeVar("_T")
KEYS = Keys("plan")
RETENTION = Retention()
TTL = 300.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedRedis:
    """Answers each command from a script, in order, and records every command it was given.
    An answer that is an exception is raised, as redis-py would raise it."""

    runs: Iterator[list[Any] | Exception] = field(default_factory=lambda: iter([]))
    """Answers to ``RunScripts``: the pipeline's results, or what executing it raised."""
    clock_values: Iterator[Any | Exception] = field(default_factory=lambda: iter([]))
    """Answers to ``ReadClock``."""
    replicas: dict[str, Any] | Exception = field(default_factory=lambda: {"connected_slaves": 1})
    """The answer to every ``CountReplicas``."""
    clock: FakeClock = field(default_factory=FakeClock)
    commands: list[Command] = field(default_factory=list)

    def answer(self, command: Command) -> Any:
        self.commands.append(command)
        reply: Any = None
        match command:
            case RunScripts():
                reply = next(self.runs)
                reply = list(reply) if isinstance(reply, list) else reply
            case ReadClock():
                reply = next(self.clock_values)
            case CountReplicas():
                reply = self.replicas
            case Sleep():
                self.clock.now += command.seconds
        if isinstance(reply, Exception):
            raise reply
        return reply

    def kinds(self) -> list[str]:
        return [type(command).__name__ for command in self.commands]

    def runs_sent(self) -> list[RunScripts]:
        return [c for c in self.commands if isinstance(c, RunScripts)]


def drive(plan: PublishPlan, steps: Plan[_T], redis: ScriptedRedis) -> _T:
    """What both transports do: carry out each command and hand back its result, or throw in
    the exception it raised; an ``Attempt`` is the plan's own ``attempt``, driven the same way."""
    step = advance(steps)
    while not isinstance(step, Done):
        try:
            if isinstance(step, Attempt):
                redis.commands.append(step)
                result = drive(plan, plan.attempt(step.messages, step.priors), redis)
            else:
                result = redis.answer(step)
        except Exception as exc:
            step = advance(steps, failure=exc)
        else:
            step = advance(steps, result)
    return step.value


def new_plan(redis: ScriptedRedis, **options: Any) -> PublishPlan:
    return PublishPlan(KEYS, RETENTION, idempotency_ttl=TTL, clock=redis.clock, **options)


def send(plan: PublishPlan, redis: ScriptedRedis, messages: list[Message]) -> list[str]:
    return drive(plan, plan.send(messages), redis)


def message(n: int) -> Message:
    return make_message("orders", {"n": n}, None, f"order-{n}")


def bodies(run: RunScripts) -> list[bytes]:
    return [args[0] for _, args in run.calls]


def priors(run: RunScripts) -> list[str]:
    return [args[4] for _, args in run.calls]


def failing(exc: Exception) -> Generator[Exception, None, None]:
    """The same error for every attempt."""
    while True:
        yield exc


def failing_runs(results: list[Any]) -> Iterator[list[Any]]:
    """The same pipeline results for every attempt."""
    while True:
        yield list(results)


# -- send -----------------------------------------------------------------------------------


def test_a_publish_is_one_pipeline_of_script_runs_and_returns_their_ids() -> None:
    redis = ScriptedRedis(runs=iter([[b"7-0", b"7-1"]]))
    plan = new_plan(redis)
    messages = [message(1), message(2)]

    assert send(plan, redis, messages) == ["7-0", "7-1"]
    assert redis.kinds() == ["Attempt", "RunScripts"]
    (run,) = redis.runs_sent()
    assert run.calls == tuple(script_call(KEYS, RETENTION, m, TTL) for m in messages)
    assert run.wait_replicas == 0, "no WAIT unless replicas are asked for"


def test_a_transient_error_is_followed_by_a_reconnect_a_pause_and_the_same_publish() -> None:
    redis = ScriptedRedis(runs=iter([ConnectionError("reset"), [b"7-0"]]))
    plan = new_plan(redis, retry_for=5.0)

    assert send(plan, redis, [message(1)]) == ["7-0"]
    assert redis.kinds() == [
        "Attempt", "RunScripts", "Reconnect", "Sleep", "Attempt", "RunScripts",
    ]  # fmt: skip
    first, second = redis.runs_sent()
    assert first == second
    (pause,) = [c for c in redis.commands if isinstance(c, Sleep)]
    assert 0 < pause.seconds <= 1.0


def test_noreplicas_is_transient_too() -> None:
    """A primary that lost its replicas refuses writes for a while (``min-replicas-to-write``)."""
    refused = ResponseError("NOREPLICAS Not enough good replicas to write.")
    redis = ScriptedRedis(runs=iter([[refused], [b"7-0"]]))
    plan = new_plan(redis)

    assert send(plan, redis, [message(1)]) == ["7-0"]
    assert redis.kinds().count("Reconnect") == 1


def test_transient_errors_are_retried_for_retry_for_then_the_last_one_is_raised() -> None:
    errors = iter(TimeoutError(f"timeout {n}") for n in range(1000))
    redis = ScriptedRedis(runs=errors)
    plan = new_plan(redis, retry_for=3.0)
    started = redis.clock.now

    with pytest.raises(TimeoutError) as raised:
        send(plan, redis, [message(1)])

    attempts = redis.kinds().count("Attempt")
    assert attempts > 3
    assert str(raised.value) == f"timeout {attempts - 1}", "the last error, not the first"
    assert redis.clock.now - started == pytest.approx(3.0), "paused until retry_for, no longer"
    assert redis.kinds()[-2:] == ["Attempt", "RunScripts"], "no pause after giving up"


def test_with_retry_for_zero_a_transient_error_is_raised_at_once() -> None:
    redis = ScriptedRedis(runs=failing(ConnectionError("refused")))
    plan = new_plan(redis, retry_for=0.0)

    with pytest.raises(ConnectionError, match="refused"):
        send(plan, redis, [message(1)])
    assert redis.kinds() == ["Attempt", "RunScripts"]


def test_a_permanent_error_is_raised_at_once_without_a_retry() -> None:
    wrong = ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    redis = ScriptedRedis(runs=iter([[b"7-0", wrong]]))
    plan = new_plan(redis, retry_for=10.0)

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        send(plan, redis, [message(1), message(2)])
    assert redis.kinds() == ["Attempt", "RunScripts"]


def test_an_error_that_is_not_redis_s_is_not_retried() -> None:
    redis = ScriptedRedis(runs=iter([ValueError("a bug")]))
    plan = new_plan(redis, retry_for=10.0)

    with pytest.raises(ValueError, match="a bug"):
        send(plan, redis, [message(1)])
    assert redis.kinds() == ["Attempt", "RunScripts"]


# -- NOSCRIPT -------------------------------------------------------------------------------


def test_noscript_loads_the_script_and_runs_only_the_publishes_that_did_not_run() -> None:
    """The others were stored: their ids are kept, and the ids come back in order."""
    unloaded = NoScriptError("NOSCRIPT No matching script.")
    redis = ScriptedRedis(runs=iter([[unloaded, b"7-1", unloaded], [b"7-2", b"7-3"]]))
    plan = new_plan(redis)
    messages = [message(0), message(1), message(2)]

    assert send(plan, redis, messages) == ["7-2", "7-1", "7-3"]
    assert redis.kinds() == ["Attempt", "RunScripts", "LoadScript", "RunScripts"]
    _, rerun = redis.runs_sent()
    assert bodies(rerun) == [messages[0].body, messages[2].body]


def test_a_script_still_unloaded_after_loading_it_is_an_error() -> None:
    unloaded = NoScriptError("NOSCRIPT No matching script.")
    redis = ScriptedRedis(runs=iter([[unloaded], [unloaded]]))
    plan = new_plan(redis, retry_for=10.0)

    with pytest.raises(NoScriptError, match="could not be loaded"):
        send(plan, redis, [message(1)])
    assert redis.kinds() == ["Attempt", "RunScripts", "LoadScript", "RunScripts"]


# -- replicas -------------------------------------------------------------------------------


def test_with_replicas_each_pipeline_ends_with_wait_and_its_count_confirms_the_publish() -> None:
    redis = ScriptedRedis(runs=iter([[b"7-0", 2]]))
    plan = new_plan(redis, wait_replicas=2, wait_timeout=0.25)

    assert send(plan, redis, [message(1)]) == ["7-0"]
    (run,) = redis.runs_sent()
    assert (run.wait_replicas, run.wait_timeout_ms) == (2, 250)


def test_a_retry_of_an_unconfirmed_publish_asks_for_the_ids_it_was_given() -> None:
    """Sticky ids: the unconfirmed event may have been delivered live already."""
    redis = ScriptedRedis(runs=iter([[b"7-0", b"7-1", 0], [b"7-0", b"7-1", 1]]))
    plan = new_plan(redis, wait_replicas=1)

    assert send(plan, redis, [message(1), message(2)]) == ["7-0", "7-1"]
    first, retry = redis.runs_sent()
    assert priors(first) == ["", ""]
    assert priors(retry) == ["7-0", "7-1"]
    attempts = [c for c in redis.commands if isinstance(c, Attempt)]
    assert [a.priors for a in attempts] == [("", ""), ("7-0", "7-1")]


def test_a_final_not_replicated_says_how_many_replicas_are_attached() -> None:
    redis = ScriptedRedis(runs=failing_runs([b"7-0", 0]), replicas={"connected_slaves": 0})
    plan = new_plan(redis, wait_replicas=1, retry_for=0.5)

    with pytest.raises(NotReplicated) as raised:
        send(plan, redis, [message(1)])
    assert raised.value.ids == ["7-0"]
    assert (raised.value.replicas, raised.value.wanted, raised.value.attached) == (0, 1, 0)
    assert redis.kinds()[-1] == "CountReplicas", "counted when giving up"


def test_a_replica_count_that_fails_leaves_attached_unknown() -> None:
    redis = ScriptedRedis(runs=iter([[b"7-0", 0]]), replicas=RedisError("no INFO"))
    plan = new_plan(redis, wait_replicas=1, retry_for=0.0)

    with pytest.raises(NotReplicated) as raised:
        send(plan, redis, [message(1)])
    assert raised.value.attached is None


def test_the_replicas_are_counted_at_the_first_publish_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="publisher")
    redis = ScriptedRedis(runs=iter([[b"7-0", 1], [b"7-1", 1]]), replicas={"connected_slaves": 0})
    plan = new_plan(redis, wait_replicas=1)

    send(plan, redis, [message(1)])
    send(plan, redis, [message(2)])

    assert redis.kinds() == [
        "CountReplicas", "Attempt", "RunScripts", "Attempt", "RunScripts",
    ]  # fmt: skip
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "publisher"]
    assert "wait_replicas=1" in warning
    assert "0 replicas attached" in warning


def test_replicas_that_could_not_be_counted_are_counted_at_the_next_publish() -> None:
    redis = ScriptedRedis(runs=iter([[b"7-0", 1], [b"7-1", 1]]), replicas=OSError("down"))
    plan = new_plan(redis, wait_replicas=1)

    send(plan, redis, [message(1)])
    send(plan, redis, [message(2)])
    assert redis.kinds().count("CountReplicas") == 2


def test_without_replicas_asked_for_none_are_counted() -> None:
    redis = ScriptedRedis(runs=iter([[b"7-0"]]))
    send(new_plan(redis), redis, [message(1)])
    assert "CountReplicas" not in redis.kinds()


# -- position -------------------------------------------------------------------------------


def position(plan: PublishPlan, redis: ScriptedRedis) -> str:
    return drive(plan, plan.position(), redis)


def test_the_position_is_the_clock_key_or_the_beginning() -> None:
    redis = ScriptedRedis(clock_values=iter([b"12-3", None]))
    plan = new_plan(redis)

    assert position(plan, redis) == "12-3"
    assert position(plan, redis) == "0-0"
    assert redis.commands == [ReadClock(KEYS.clock), ReadClock(KEYS.clock)]


def test_the_position_retries_a_transient_error() -> None:
    redis = ScriptedRedis(clock_values=iter([ConnectionError("reset"), b"12-3"]))
    plan = new_plan(redis)

    assert position(plan, redis) == "12-3"
    assert redis.kinds() == ["ReadClock", "Reconnect", "Sleep", "ReadClock"]


def test_the_position_gives_up_after_retry_for() -> None:
    redis = ScriptedRedis(clock_values=failing(TimeoutError("timeout")))
    plan = new_plan(redis, retry_for=2.0)
    started = redis.clock.now

    with pytest.raises(TimeoutError):
        position(plan, redis)
    assert redis.clock.now - started == pytest.approx(2.0)
    assert redis.kinds()[-1] == "ReadClock"


def test_a_clock_that_holds_no_id_is_an_error_not_retried() -> None:
    redis = ScriptedRedis(clock_values=iter([b"garbage"]))
    plan = new_plan(redis)

    with pytest.raises(ValueError, match="not an id"):
        position(plan, redis)
    assert redis.kinds() == ["ReadClock"]


def test_commands_are_values() -> None:
    """Frozen and comparable, so a plan's steps can be recorded and checked like these."""
    assert Sleep(0.5) == Sleep(0.5)
    assert Reconnect() == Reconnect()
    with pytest.raises(AttributeError):
        Sleep(0.5).seconds = 1.0  # type: ignore[misc]
