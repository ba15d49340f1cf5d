from pathlib import Path

import pytest

from engine.config import Config, ConfigError, build_config, load_config


def test_defaults_are_loopback_and_standard_ports(tmp_path: Path) -> None:
    config = load_config({}, None, environ={"MLXD_HOME": str(tmp_path)})
    assert config.host == "127.0.0.1"
    assert (config.chat_port, config.embeddings_port, config.stt_port) == (8080, 8081, 8082)
    assert config.only == ("chat", "embeddings", "stt")
    assert config.home == tmp_path


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    file = tmp_path / "mlxd.toml"
    file.write_text('chat-port = 9000\nembeddings_port = 9001\nstt_port = 9002\nonly = ["chat"]\n')
    env = {"MLXD_HOME": str(tmp_path), "MLXD_EMBEDDINGS_PORT": "9101", "MLXD_STT_PORT": "9102"}
    config = load_config({"stt_port": 9202}, str(file), environ=env)
    assert config.chat_port == 9000  # file
    assert config.embeddings_port == 9101  # environment over file
    assert config.stt_port == 9202  # flag over both
    assert config.only == ("chat",)


def test_default_config_file_in_home_is_read(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("queue_size = 3\nstrict_model = true\n")
    config = load_config({}, None, environ={"MLXD_HOME": str(tmp_path)})
    assert config.queue_size == 3
    assert config.strict_model is True


def test_env_booleans_and_lists(tmp_path: Path) -> None:
    env = {
        "MLXD_HOME": str(tmp_path),
        "MLXD_STRICT_MODEL": "yes",
        "MLXD_ONLY": "chat, stt",
        "MLXD_ALLOWED_HOSTS": "myhost.local",
    }
    config = load_config({}, None, environ=env)
    assert config.strict_model is True
    assert config.only == ("chat", "stt")
    assert config.allowed_hosts == ("myhost.local",)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"host": "0.0.0.0"}, "without an API key"),
        ({"only": "chat,video"}, "--only"),
        ({"chat_port": 8081}, "own port"),
        ({"stt_port": 70000}, "out of range"),
        ({"queue_size": 0}, "queue_size"),
        ({"bogus": 1}, "unknown configuration keys: bogus"),
        ({"chat_port": "eighty"}, "chat_port"),
    ],
)
def test_bad_values_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_non_loopback_with_api_key_is_allowed() -> None:
    assert build_config({"host": "0.0.0.0", "api_key": "k"}).host == "0.0.0.0"


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("chat_port = = 1")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config({}, str(file), environ={})


def test_json_round_trip(tmp_path: Path) -> None:
    config = build_config({"home": str(tmp_path), "api_key": "secret", "cors_origins": "a,b"})
    assert Config.from_json(config.to_json()) == config


def test_readme_flag_table_is_generated_from_the_config() -> None:
    from pathlib import Path

    from engine.config import flags_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("<!-- serve-flags")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- /serve-flags -->")]
    assert table.strip() == flags_markdown()


def test_every_config_field_is_a_serve_flag_with_help() -> None:
    import argparse
    import dataclasses

    from engine.config import Config, add_serve_flags

    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    dests = {action.dest for action in parser._actions}
    for field in dataclasses.fields(Config):
        assert field.name in dests and field.metadata["help"], field.name
