from __future__ import annotations

import re
from pathlib import Path

import pytest
from msgspec import inspect

from gateway.config import (
    OTHER_VARIABLES,
    RUNWARE_URL,
    Config,
    ConfigError,
    known_variables,
    load_config,
)


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


def test_a_provider_key_without_a_url_means_runware_itself() -> None:
    """A key alone used to run the local renderer and count fake spend."""
    config = load_config(None, env={"RUNWARE_API_KEY": "rk"})
    assert config.provider.url == RUNWARE_URL == "wss://ws-api.runware.ai/v1"
    assert config.provider.api_key == "rk"
    assert load_config(None, env={}).provider.url is None  # no key: the local provider


def test_local_cost_is_off_unless_asked_for() -> None:
    assert load_config(None, env={}).provider.local_cost is False
    config = load_config(None, env={"TENEBRA_PROVIDER_LOCAL_COST": "true"})
    assert config.provider.local_cost is True


def test_overrides_come_last_and_are_checked_like_the_rest() -> None:
    env = {"TENEBRA_SERVER_PORT": "9100", "RUNWARE_API_KEY": "rk"}
    config = load_config(
        None, env=env, overrides={"server.port": 9200, "provider.url": "ws://127.0.0.1:1/v1"}
    )
    assert config.server.port == 9200 and config.provider.url == "ws://127.0.0.1:1/v1"
    with pytest.raises(ConfigError, match=r"^server\.port: Expected `int` <= 65535"):
        load_config(None, env={}, overrides={"server.port": 70000})


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("tasks.retention", "-5", "Expected `float` >= 0"),
        ("server.port", "-1", "Expected `int` >= 0"),
        ("server.port", "65536", "Expected `int` <= 65535"),
        ("server.idle_timeout", "0", "Expected `float` > 0"),
        ("server.max_frame_bytes", "0", "Expected `int` >= 1"),
        ("server.socket_send_buffer_bytes", "-1", "Expected `int` >= 0"),
        ("provider.links", "0", "Expected `int` >= 1"),
        ("provider.ping_interval", "0", "Expected `float` > 0"),
        ("provider.backoff_initial", "-0.5", "Expected `float` > 0"),
        ("tasks.max_retained", "0", "Expected `int` >= 1"),
        ("tasks.timeout", "0", "Expected `float` > 0"),
        ("delivery.attempts", "0", "Expected `int` >= 1"),
        ("delivery.per_host", "0", "Expected `int` >= 1"),
        ("delivery.timeout", "-1", "Expected `float` > 0"),
    ],
)
def test_numbers_out_of_range_stop_the_start_naming_the_setting(
    setting: str, value: str, message: str
) -> None:
    variable = "TENEBRA_" + setting.replace(".", "_").upper()
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={variable: value})
    assert str(caught.value).startswith(f"{setting}: {message}")


def test_every_numeric_setting_has_a_range() -> None:
    """A number added without a range would start with any value; this catches it."""
    unranged = []
    config = inspect.type_info(Config)
    assert isinstance(config, inspect.StructType)
    for section in config.fields:
        settings = section.type
        if isinstance(settings, inspect.DictType):  # tenants.<name>
            settings = settings.value_type
        if not isinstance(settings, inspect.StructType):
            continue
        for field in settings.fields:
            kinds = field.type.types if isinstance(field.type, inspect.UnionType) else [field.type]
            unranged += [
                f"{section.name}.{field.name}"
                for kind in kinds
                if isinstance(kind, inspect.IntType | inspect.FloatType)
                and kind.ge is None
                and kind.gt is None
            ]
    assert unranged == []


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("TENEBRA_SERVER_PROT", "TENEBRA_SERVER_PROT: unknown setting; did you mean "
         "TENEBRA_SERVER_PORT?"),
        ("TENEBRA_DEMOKEY", "TENEBRA_DEMOKEY: unknown setting; did you mean TENEBRA_DEMO_KEY?"),
        ("TENEBRA_TASK_RETENTION", "did you mean TENEBRA_TASKS_RETENTION?"),
        ("TENEBRA_WHATEVER", "TENEBRA_WHATEVER: unknown setting"),
    ],
)  # fmt: skip
def test_an_unknown_variable_stops_the_start_with_a_suggestion(variable: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, env={variable: "1"})


@pytest.mark.parametrize("variable", sorted(OTHER_VARIABLES))
def test_the_variables_read_elsewhere_are_known(variable: str) -> None:
    load_config(None, env={variable: "1"})


def test_every_tenebra_variable_the_code_reads_is_known() -> None:
    """A variable read somewhere in the tree but unknown here would stop `tenebra serve`."""
    root = Path(__file__).resolve().parents[2]
    found: set[str] = set()
    for directory in ("gateway", "protocol", "bench", "tests"):
        for path in (root / directory).rglob("*.py"):
            if path != Path(__file__).resolve():  # this file's misspellings are on purpose
                found.update(re.findall(r"\bTENEBRA_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert found, "the scan found nothing: wrong root?"
    assert found <= known_variables(), found - known_variables()


def test_list_settings_come_from_the_environment_as_json_arrays() -> None:
    env = {
        "TENEBRA_SERVER_TRUSTED_PROXIES": '["10.0.0.0/8", "::1"]',
        "TENEBRA_DELIVERY_ALLOW": '["127.0.0.1/32"]',
    }
    config = load_config(env=env)
    assert config.server.trusted_proxies == ["10.0.0.0/8", "::1"]
    assert config.delivery.allow == ["127.0.0.1/32"]
    with pytest.raises(ConfigError, match="TENEBRA_SERVER_TRUSTED_PROXIES: not a JSON array"):
        load_config(env={"TENEBRA_SERVER_TRUSTED_PROXIES": "[10.0.0.0/8"})
    with pytest.raises(ConfigError, match=re.escape("server.trusted_proxies: 'nonsense'")):
        load_config(env={"TENEBRA_SERVER_TRUSTED_PROXIES": '["nonsense"]'})
