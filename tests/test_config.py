"""Node settings: file < environment < flags, every bound validated; topic configs validated."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from headwater.config import (
    ConfigError,
    NodeConfig,
    add_config_flags,
    config_from_args,
    effective_topic_config,
    load_config,
    validate_topic_configs,
)


def test_defaults_need_no_file_env_or_flags() -> None:
    assert load_config(env={}) == NodeConfig()


def test_flags_override_environment_which_overrides_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('[node]\nport = 9001\nmax_message_bytes = 2000000\nrack = "a"\n')
    env = {"HEADWATER_PORT": "9002", "HEADWATER_RACK": "b", "UNRELATED": "x"}
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--config", str(toml), "--port", "9003"])
    cfg = config_from_args(args, env=env)
    assert cfg.port == 9003  # flag
    assert cfg.rack == "b"  # environment over file
    assert cfg.max_message_bytes == 2_000_000  # file over default
    assert cfg.node_id == NodeConfig().node_id  # default


def test_unknown_settings_and_bad_values_are_clear_errors(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text("max_mesage_bytes = 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_mesage_bytes'"):
        load_config(str(toml), env={})
    with pytest.raises(ConfigError, match="not a valid int"):
        load_config(env={"HEADWATER_PORT": "many"})
    with pytest.raises(ConfigError, match="port"):
        load_config(env={}, overrides={"port": 70000})
    with pytest.raises(ConfigError, match="max_fetch_waiters"):
        load_config(env={}, overrides={"max_fetch_waiters": 0})
    with pytest.raises(ConfigError, match="max_request_bytes"):
        load_config(env={}, overrides={"max_message_bytes": 64 << 20})
    with pytest.raises(ConfigError, match="log_flush_policy"):
        load_config(env={}, overrides={"log_flush_policy": "sometimes"})


def test_topic_configs_accept_kafka_spelling_and_refuse_nonsense() -> None:
    assert validate_topic_configs({"retention.ms": "1000", "max-message-bytes": "10"}) == {
        "retention_ms": "1000",
        "max_message_bytes": "10",
    }
    for bad in ({"retention_ms": "-2"}, {"retention_ms": "soon"}, {"no_such": "1"}, {"flush_policy": "x"}):
        with pytest.raises(ConfigError):
            validate_topic_configs(bad)


def test_effective_topic_config_falls_back_to_node_defaults() -> None:
    node = NodeConfig(log_retention_ms=123, max_message_bytes=456)
    eff = effective_topic_config({"retention_ms": "99"}, node)
    assert eff["retention_ms"] == 99
    assert eff["max_message_bytes"] == 456
    assert eff["retention_bytes"] == node.log_retention_bytes
    assert eff["cleanup_policy"] == "delete"


def test_every_setting_says_what_it_means() -> None:
    # `headwater node --help` shows these; a setting without words is a flag nobody can use.
    for f in dataclasses.fields(NodeConfig):
        doc = f.metadata.get("doc", "")
        assert isinstance(doc, str) and len(doc.split()) >= 3, f.name
    assert "s3cret" not in repr(NodeConfig(cluster_secret="s3cret"))  # the secret stays out of logs
