"""One Settings object: flag > SSE_GATEWAY_* variable > default; bad values stop the start."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import pytest

from gateway.config import Settings, add_arguments, settings_from


def settings(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="sse-gateway serve")
    add_arguments(parser)
    return settings_from(parser.parse_args(argv or []), environ=env or {})


def test_defaults() -> None:
    s = settings()
    assert s == Settings()
    assert (s.host, s.port, s.redis_url, s.prefix) == ("127.0.0.1", 8000, None, "sse")
    assert (s.heartbeat, s.retry_ms, s.send_timeout, s.linger) == (15.0, 3000, 10.0, 2.0)
    assert s.max_pending_bytes == 1 << 20
    assert (s.max_events, s.max_age, s.max_publish_bytes) == (2000, 3600.0, 64 * 1024)
    assert (s.allow_remote_publish, s.access_log, s.log_level) == (False, True, "info")
    assert s.engine_name == "memory"


def test_defaults_without_an_argparse_namespace() -> None:
    assert settings_from(environ={}) == Settings()


def test_environment_variables_are_read() -> None:
    env = {
        "SSE_GATEWAY_HOST": "0.0.0.0",
        "SSE_GATEWAY_PORT": "9100",
        "SSE_GATEWAY_REDIS_URL": "redis://cache:6379/2",
        "SSE_GATEWAY_PREFIX": "app",
        "SSE_GATEWAY_HEARTBEAT": "2.5",
        "SSE_GATEWAY_RETRY_MS": "0",
        "SSE_GATEWAY_MAX_PENDING_BYTES": "4096",
        "SSE_GATEWAY_MAX_AGE": "0",
        "SSE_GATEWAY_LOG_LEVEL": "debug",
    }
    s = settings(env=env)
    assert (s.host, s.port, s.redis_url, s.prefix) == (
        "0.0.0.0",
        9100,
        "redis://cache:6379/2",
        "app",
    )
    assert (s.heartbeat, s.retry_ms, s.max_pending_bytes, s.max_age) == (2.5, 0, 4096, 0.0)
    assert s.log_level == "debug"
    assert s.engine_name == "redis"
    assert isinstance(s.port, int)
    assert isinstance(s.heartbeat, float)


def test_unrelated_environment_variables_are_ignored() -> None:
    assert settings(env={"PORT": "1", "SSE_GATEWAY": "x", "sse_gateway_port": "2"}) == Settings()


def test_a_flag_wins_over_the_environment_variable() -> None:
    env = {"SSE_GATEWAY_PORT": "9100", "SSE_GATEWAY_HEARTBEAT": "2", "SSE_GATEWAY_PREFIX": "env"}
    s = settings(["--port", "9200", "--prefix", "flag"], env)
    assert (s.port, s.prefix) == (9200, "flag")
    assert s.heartbeat == 2.0, "a variable without a flag still applies"


def test_a_false_boolean_flag_wins_over_a_true_environment_variable() -> None:
    env = {"SSE_GATEWAY_ACCESS_LOG": "true", "SSE_GATEWAY_ALLOW_REMOTE_PUBLISH": "true"}
    s = settings(["--no-access-log", "--no-allow-remote-publish"], env)
    assert (s.access_log, s.allow_remote_publish) == (False, False)
    s = settings(["--allow-remote-publish"], {"SSE_GATEWAY_ALLOW_REMOTE_PUBLISH": "0"})
    assert s.allow_remote_publish is True


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
        ("false", False), ("0", False), ("no", False), ("off", False), (" False ", False),
    ],
)  # fmt: skip
def test_booleans_from_the_environment(text: str, value: bool) -> None:
    s = settings(env={"SSE_GATEWAY_ALLOW_REMOTE_PUBLISH": text, "SSE_GATEWAY_ACCESS_LOG": text})
    assert s.allow_remote_publish is value
    assert s.access_log is value


def test_an_invalid_boolean_variable_exits_naming_the_variable() -> None:
    with pytest.raises(SystemExit) as info:
        settings(env={"SSE_GATEWAY_ACCESS_LOG": "maybe"})
    assert "SSE_GATEWAY_ACCESS_LOG" in str(info.value.code)
    assert "maybe" in str(info.value.code)


@pytest.mark.parametrize(
    ("variable", "text"),
    [
        ("SSE_GATEWAY_PORT", "eighty"),
        ("SSE_GATEWAY_PORT", "80.5"),
        ("SSE_GATEWAY_PORT", ""),
        ("SSE_GATEWAY_HEARTBEAT", "soon"),
        ("SSE_GATEWAY_MAX_PENDING_BYTES", "1MiB"),
    ],
)
def test_a_non_numeric_variable_exits_naming_the_variable(variable: str, text: str) -> None:
    with pytest.raises(SystemExit) as info:
        settings(env={variable: text})
    assert variable in str(info.value.code)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--heartbeat", "0"),
        ("--heartbeat", "-1"),
        ("--max-pending-bytes", "0"),
        ("--send-timeout", "0"),
        ("--subscribe-timeout", "0"),
        ("--max-events", "0"),
        ("--linger", "-0.5"),
        ("--max-age", "-1"),
        ("--retry-ms", "-1"),
    ],
)
def test_an_out_of_range_value_exits_naming_the_flag(flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as info:
        settings([flag, value])
    assert flag in str(info.value.code)
    variable = "SSE_GATEWAY_" + flag.removeprefix("--").replace("-", "_").upper()
    with pytest.raises(SystemExit) as info:
        settings(env={variable: value})
    assert flag in str(info.value.code) or variable in str(info.value.code)


def test_zero_is_allowed_where_it_has_a_meaning() -> None:
    s = settings(["--retry-ms", "0", "--linger", "0", "--max-age", "0"])
    assert (s.retry_ms, s.linger, s.max_age) == (0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--heartbeat", "nan"),
        ("--send-timeout", "nan"),
        ("--max-age", "nan"),
        ("--max-age", "inf"),
    ],
)
def test_a_non_finite_number_exits_naming_the_flag(flag: str, value: str) -> None:
    """NaN passes every ``<= 0`` check; ``--max-age inf``/``nan`` would make every publish fail
    (``int(max_age * 1000)`` raises), so the start must refuse them."""
    with pytest.raises(SystemExit) as info:
        settings([flag, value])
    assert flag in str(info.value.code)


def test_a_non_numeric_flag_exits_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        settings(["--heartbeat", "soon"])
    assert info.value.code == 2
    assert "--heartbeat" in capsys.readouterr().err


# -- redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@cache:6379/0", "redis://user:***@cache:6379/0"),
        ("redis://:s3cret@cache:6379", "redis://:***@cache:6379"),
        (
            "rediss://default:p%40ss@cache.example:6380/1",
            "rediss://default:***@cache.example:6380/1",
        ),
        ("redis://s3cret:s3cret@cache", "redis://s3cret:***@cache"),
    ],
)
def test_redacted_redis_url_hides_the_password(url: str, shown: str) -> None:
    assert Settings(redis_url=url).redacted_redis_url() == shown


def test_redacted_redis_url_hides_a_password_given_in_the_query() -> None:
    """redis-py accepts ``?password=`` in the URL, so it is a password too."""
    redacted = Settings(redis_url="redis://cache:6379/0?password=s3cret").redacted_redis_url()
    assert redacted is not None
    assert "s3cret" not in redacted
    assert redacted.startswith("redis://cache:6379/0")


def test_redacted_redis_url_leaves_urls_without_a_password_alone() -> None:
    assert Settings(redis_url="redis://cache:6379/0").redacted_redis_url() == "redis://cache:6379/0"
    assert Settings(redis_url="unix:///run/redis.sock").redacted_redis_url() == (
        "unix:///run/redis.sock"
    )
    assert Settings().redacted_redis_url() is None
