"""Settings from the environment: defaults, parsing, one error naming every problem."""

from __future__ import annotations

import pytest

from tests.web_support import OTHER_SECRET, SECRET, UNKNOWN_SECRET
from webhook_sync import errors
from webhook_sync.config import Config


def test_defaults() -> None:
    """With nothing set, the documented defaults apply."""
    config = Config.from_env({})

    assert (config.port, config.poll_interval_seconds, config.max_rps) == (8000, 120, 40.0)
    assert config.max_webhook_bytes == 32 * 1024 * 1024
    assert config.api_base_url == "https://api.replicate.com/v1"


def test_database_schema_defaults_to_webhook_sync_and_takes_a_plain_name() -> None:
    """DATABASE_SCHEMA is `webhook_sync` unless set to another plain identifier."""
    assert Config.from_env({}).database_schema == "webhook_sync"
    assert Config.from_env({"DATABASE_SCHEMA": "ws_two"}).database_schema == "ws_two"


@pytest.mark.parametrize(
    "value",
    ["Webhook", "two words", 'x"; DROP', "1st", "a" * 48, "public", "pg_catalog", "x.y"],
)
def test_database_schema_refuses_what_is_not_a_plain_name_of_our_own(value: str) -> None:
    """A name that would need quoting, is too long for the NOTIFY channel, or is public
    or PostgreSQL's own is refused, naming DATABASE_SCHEMA."""
    with pytest.raises(errors.ConfigError, match="DATABASE_SCHEMA"):
        Config.from_env({"DATABASE_SCHEMA": value})


def test_several_secrets_split_on_spaces_and_commas() -> None:
    """REPLICATE_WEBHOOK_SECRET holds several secrets for rotation."""
    config = Config.from_env(
        {"REPLICATE_WEBHOOK_SECRET": f"{SECRET}, {OTHER_SECRET} {UNKNOWN_SECRET}"}
    )

    assert config.webhook_secrets == (SECRET, OTHER_SECRET, UNKNOWN_SECRET)


@pytest.mark.parametrize(
    ("weak", "reason"),
    [
        ("whsec_AA", "secret #2 is shorter than 16 bytes"),
        ("whsec_dGVzdA$$==", "secret #2 is not valid base64"),
        ("AAAAAAAAAAAAAAAAAAAAAAAAAAAA", "secret #2 must look like whsec_<base64>"),
    ],
)
def test_weak_or_malformed_secret_is_refused_when_settings_are_read(weak: str, reason: str) -> None:
    """A secret under 16 bytes or not strict base64 is refused by position, never echoed."""
    with pytest.raises(errors.ConfigError, match=reason) as caught:
        Config.from_env({"REPLICATE_WEBHOOK_SECRET": f"{SECRET} {weak}"})

    assert weak.removeprefix("whsec_") not in str(caught.value)


def test_every_problem_is_named_at_once_without_secret_values() -> None:
    """All invalid settings appear in one error that never echoes a secret or password."""
    with pytest.raises(errors.ConfigError) as caught:
        Config.from_env(
            {
                "PORT": "eighty",
                "POLL_INTERVAL_SECONDS": "0",
                "REPLICATE_WEBHOOK_SECRET": "v1,notasecret",
                "DATABASE_URL": "mysql://user:hunter2@db/x",
            }
        )

    message = str(caught.value)
    assert all(
        name in message
        for name in ("PORT", "POLL_INTERVAL_SECONDS", "REPLICATE_WEBHOOK_SECRET", "DATABASE_URL")
    )
    assert "notasecret" not in message and "hunter2" not in message


def test_repr_hides_secrets() -> None:
    """repr(config) never shows the token, the secrets or the database URL."""
    config = Config.from_env(
        {
            "REPLICATE_API_TOKEN": "r8_topsecret",
            "REPLICATE_WEBHOOK_SECRET": SECRET,
            "DATABASE_URL": "postgresql://u:pw123@h/d",
        }
    )

    assert not any(s in repr(config) for s in ("r8_topsecret", SECRET[6:], "pw123"))


@pytest.mark.parametrize("character", ["%", "@", "/", "#", " ", "?"])
def test_database_url_with_a_reserved_character_left_raw_is_refused_unechoed(
    character: str,
) -> None:
    """A password holding a URL's reserved character unencoded is refused when the settings
    are read; the error names DATABASE_URL and shows nothing of the value."""
    url = f"postgresql://app_user:Kq7v{character}Zt9w@db.example.com:5432/app"

    with pytest.raises(errors.ConfigError) as caught:
        Config.from_env({"DATABASE_URL": url})

    message = str(caught.value)
    assert "DATABASE_URL" in message
    assert not any(part in message for part in ("Kq7v", "Zt9w", "app_user", "db.example.com"))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:Kq7v%25Zt9w%40Wm3r%2FRx8k%3AVb2n%23Np5j%20Jd4h@db.example.com:5432/app",
        "postgres://u:pa:ss@h/d",
        "postgresql:///app",
        "postgresql://h1:5432,h2:5433/app?target_session_attrs=read-write",
        "postgresql://[::1]:5432/app?options=-c%20search_path%3Dx",
        "postgresql://u@h/app?host=/var/run/postgresql",
        "postgresql://postgres:@/postgres?host=/home/me/My Projects/.data/pg",
    ],
)
def test_database_url_spelled_right_is_accepted(url: str) -> None:
    """Percent-encoded passwords, socket URLs, host lists and IPv6 hosts are accepted as is."""
    assert Config.from_env({"DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(
    "url",
    ["http://api.example.com/v1", "http://10.0.0.5:8000/v1", "http://replicate/v1"],
)
def test_plain_http_api_base_url_off_this_machine_is_refused(url: str) -> None:
    """REPLICATE_API_BASE_URL over http:// to another host would send the token in clear."""
    with pytest.raises(errors.ConfigError) as caught:
        Config.from_env({"REPLICATE_API_BASE_URL": url, "REPLICATE_API_TOKEN": "r8_secret"})

    assert "REPLICATE_API_BASE_URL" in str(caught.value)
    assert "r8_secret" not in str(caught.value)


HTTPS_OR_LOOPBACK_URLS = [
    "https://api.example.com/v1",
    "http://127.0.0.1:8123/v1",
    "http://localhost:8123/v1",
    "http://[::1]:8123/v1",
]


@pytest.mark.parametrize("url", HTTPS_OR_LOOPBACK_URLS)
def test_api_base_url_over_https_or_to_loopback_is_accepted(url: str) -> None:
    """https anywhere, and plain http to this machine (the local simulator)."""
    assert Config.from_env({"REPLICATE_API_BASE_URL": url}).api_base_url == url


@pytest.mark.parametrize("url", HTTPS_OR_LOOPBACK_URLS)
def test_notify_url_over_https_or_to_loopback_is_accepted(url: str) -> None:
    """NOTIFY_URLS take the same hosts as REPLICATE_API_BASE_URL for plain http."""
    settings = {"NOTIFY_URLS": url, "NOTIFY_SECRET": SECRET}
    assert Config.from_env(settings).notify_urls == (url,)


def test_notify_settings_parse_urls_secrets_events_and_age() -> None:
    """NOTIFY_*: several URLs and secrets, a subset of events, an age with a unit."""
    config = Config.from_env(
        {
            "NOTIFY_URLS": "https://app.example/hooks, http://127.0.0.1:9000/h http://localhost/x",
            "NOTIFY_SECRET": f"{SECRET} {OTHER_SECRET}",
            "NOTIFY_EVENTS": "training.failed,training.completed",
            "NOTIFY_MAX_AGE": "12h",
        }
    )

    assert config.notify_urls == (
        "https://app.example/hooks",
        "http://127.0.0.1:9000/h",
        "http://localhost/x",
    )
    assert config.notify_secrets == (SECRET, OTHER_SECRET)
    assert config.notify_events == ("training.completed", "training.failed")
    assert config.notify_max_age_seconds == 12 * 3600
    assert Config.from_env({}).notify_max_age_seconds == 3 * 86400
    assert Config.from_env({}).notify_max_retry_seconds == 3600
    assert len(Config.from_env({}).notify_events) == 4
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    "url",
    [
        "http://app.example/hooks/tok_Kq7vZt9wWm3r",
        "ftp://app.example/hooks?token=tok_Kq7vZt9wWm3r",
        "http://tok_Kq7vZt9wWm3r@app.example/hooks",
        "https://app.example:tok_Kq7vZt9wWm3r/hooks",
    ],
)
def test_refused_notify_url_is_not_echoed(url: str) -> None:
    """A refused NOTIFY_URLS entry may carry a credential (a token in its path, query or
    user): the error names the setting and the URL's position, never the token."""
    settings = {"NOTIFY_URLS": f"https://ok.example/h {url}", "NOTIFY_SECRET": SECRET}
    with pytest.raises(errors.ConfigError, match="NOTIFY_URLS") as caught:
        Config.from_env(settings)

    assert "URL #2" in str(caught.value)
    assert "Kq7vZt9wWm3r" not in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"NOTIFY_URLS": "http://app.example/h", "NOTIFY_SECRET": SECRET}, "NOTIFY_URLS"),
        ({"NOTIFY_URLS": "ftp://x/y", "NOTIFY_SECRET": SECRET}, "NOTIFY_URLS"),
        ({"NOTIFY_URLS": "https://app.example/h"}, "NOTIFY_SECRET"),
        ({"NOTIFY_SECRET": "whsec_AA"}, "NOTIFY_SECRET"),
        ({"NOTIFY_EVENTS": "training.started"}, "NOTIFY_EVENTS"),
        ({"NOTIFY_MAX_AGE": "3 days"}, "NOTIFY_MAX_AGE"),
        ({"NOTIFY_LEASE_SECONDS": "5"}, "NOTIFY_LEASE_SECONDS"),
    ],
)
def test_notify_settings_refuse_what_would_not_work(settings: dict, named: str) -> None:
    """Plain http off loopback, a URL without a secret, a short secret, an unknown event,
    an unreadable age or a lease shorter than one attempt stop the process at start."""
    with pytest.raises(errors.ConfigError, match=named):
        Config.from_env(settings)
