from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config


def test_defaults_with_nothing_given() -> None:
    config = load_config(None, env={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.provider.url is None and config.tasks.retention == 3600
    assert config.keys() == {}


def test_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "tenebra.toml"
    path.write_text(
        """
        [server]
        port = 9000
        [provider]
        url = "wss://ws-api.runware.ai/v1"
        links = 2
        [tenants.studio]
        keys = ["k1", "k2"]
        """
    )
    config = load_config(
        path,
        env={"TENEBRA_SERVER_PORT": "9100", "RUNWARE_API_KEY": "rk", "TENEBRA_DEMO_KEY": "dk"},
    )
    assert config.server.port == 9100 and config.provider.links == 2
    assert config.provider.api_key == "rk"
    assert config.keys() == {"k1": "studio", "k2": "studio", "dk": "demo"}


@pytest.mark.parametrize(
    ("text", "env", "setting"),
    [
        ("[server]\nport = 'eighty'", {}, "server.port"),
        ("[server]\nprot = 1", {}, "server"),
        ("", {"TENEBRA_TASKS_RETENTION": "soon"}, "tasks.retention"),
        ("[provider]\nurl = 'http://x'\napi_key = 'k'", {}, "provider.url"),
        ("[provider]\nurl = 'wss://x/v1'", {}, "provider.api_key"),
        ("[provider]\nlinks = 0", {}, "provider.links"),
        ("[tenants.a]\nkeys = ['k']\n[tenants.b]\nkeys = ['k']", {}, "tenants.b.keys"),
        ("[server\nport = 1", {}, "tenebra.toml"),
    ],
)
def test_bad_configuration_names_the_setting(
    tmp_path: Path, text: str, env: dict[str, str], setting: str
) -> None:
    path = tmp_path / "tenebra.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        load_config(path, env=env)
