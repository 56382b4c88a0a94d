"""OPTIONS are read once, in ``conf.parse``: every problem found, nothing ignored."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_apee.conf import ApeeOptions, fingerprint, parse


def ids(options: dict) -> list[str]:
    return [problem.id for problem in parse(options)[1]]


def test_defaults_parse_without_problems():
    parsed, problems = parse({})
    assert problems == []
    assert parsed.metrics is True
    assert parsed.stats_flush_interval == 5.0
    assert parsed.tuning.wait_timeout == 10.0
    assert parsed.redis_options["SOCKET_TIMEOUT"] == 2.0


def test_a_typo_is_reported_with_the_closest_name():
    (problem,) = parse({"SOFT_TIMEOUT_RATION": 0.9})[1]
    assert problem.id == "apee.W003"
    assert not problem.is_error
    assert "'SOFT_TIMEOUT_RATION'" in problem.message
    assert problem.hint == "Did you mean 'SOFT_TIMEOUT_RATIO'?"


def test_a_key_like_nothing_gets_no_guess():
    (problem,) = parse({"ZZZZZZZZ": 1})[1]
    assert problem.id == "apee.W003"
    assert problem.hint is None


def test_django_redis_options_are_known():
    options = {
        "CLIENT_CLASS": "django_redis.client.DefaultClient",
        "CONNECTION_POOL_KWARGS": {"max_connections": 10},
        "IGNORE_EXCEPTIONS": True,
        "PASSWORD": "x",
        "SERIALIZER": "django_redis.serializers.json.JSONSerializer",
    }
    assert ids(options) == []


def test_every_error_is_reported_at_once_and_the_first_raised():
    options = {"CODEC": "yaml", "WAIT_TIMEOUT": -1, "METRICS": "yes"}
    assert ids(options) == ["apee.E001", "apee.E003", "apee.E001"]
    with pytest.raises(ImproperlyConfigured, match="CODEC"):
        ApeeOptions.from_params(options)


def test_metrics_and_flush_interval_are_parsed_here():
    parsed, problems = parse({"METRICS": False, "STATS_FLUSH_INTERVAL": 0.5})
    assert problems == []
    assert (parsed.metrics, parsed.stats_flush_interval) == (False, 0.5)
    assert ids({"STATS_FLUSH_INTERVAL": 0}) == ["apee.E003"]


def test_django_rediscache_lower_case_options_are_honoured():
    import redis

    parsed, problems = parse(
        {
            "db": 3,
            "pool_class": redis.BlockingConnectionPool,
            "parser_class": "redis.connection._RESP2Parser",
            "health_check_interval": 10,
        }
    )
    assert problems == []
    redis_options = parsed.redis_options
    assert (
        redis_options["CONNECTION_POOL_CLASS"]
        == "redis.connection.BlockingConnectionPool"
    )
    assert redis_options["PARSER_CLASS"] == "redis.connection._RESP2Parser"
    pool_kwargs = dict(redis_options["CONNECTION_POOL_KWARGS"])
    assert pool_kwargs.pop("retry").get_retries() == 0  # REDIS_RETRIES
    assert pool_kwargs == {"db": 3, "health_check_interval": 10}
    assert "db" not in redis_options


def test_django_serializer_cannot_apply_and_says_what_to_use():
    (problem,) = parse(
        {"serializer": "django.core.cache.backends.redis.RedisSerializer"}
    )[1]
    assert problem.id == "apee.E004"
    assert "CODEC" in problem.message


def test_fingerprint_follows_the_options():
    assert fingerprint({"A": 1, "B": [1]}) == fingerprint({"B": [1], "A": 1})
    assert fingerprint({"A": 1}) != fingerprint({"A": 2})
    assert parse({"HERD": False})[0].fingerprint != parse({})[0].fingerprint


def test_manage_py_check_names_a_typo_and_its_fix(capsys):
    from django.core.management import call_command
    from django.test import override_settings

    config = {
        "default": {
            "BACKEND": "django_apee.cache.ApeeCache",
            "LOCATION": "redis://127.0.0.1:9/0",
            "OPTIONS": {"SOFT_TIMEOUT_RATION": 0.9},
        }
    }
    with override_settings(CACHES=config):
        call_command("check")
    err = capsys.readouterr().err
    assert "apee.W003" in err
    assert "Did you mean 'SOFT_TIMEOUT_RATIO'?" in err


def test_near_cache_is_off_by_default_and_true_means_the_defaults():
    assert parse({})[0].near_cache is None
    assert parse({"NEAR_CACHE": False})[0].near_cache is None
    on = parse({"NEAR_CACHE": True})[0].near_cache
    assert on is not None
    assert (on.max_entries, on.max_bytes) == (10_000, 64 * 1024 * 1024)


def test_near_cache_bounds_are_parsed_and_a_missing_one_defaults():
    parsed, problems = parse({"NEAR_CACHE": {"MAX_ENTRIES": 5}})
    assert problems == []
    assert parsed.near_cache is not None
    assert (parsed.near_cache.max_entries, parsed.near_cache.max_bytes) == (
        5,
        64 * 1024 * 1024,
    )


@pytest.mark.parametrize(
    "value",
    [
        "yes",
        1,
        {"MAX_ENTRIES": 0},
        {"MAX_BYTES": -1},
        {"MAX_BYTES": 1.5},
        {"MAX_ENTRIES": True},
        {"MAX_ENTRYS": 10},
    ],
)
def test_a_bad_near_cache_is_apee_e006(value):
    _, problems = parse({"NEAR_CACHE": value})
    assert [problem.id for problem in problems][:1] == ["apee.E006"]
    with pytest.raises(ImproperlyConfigured, match="NEAR_CACHE"):
        ApeeOptions.from_params({"NEAR_CACHE": value})
