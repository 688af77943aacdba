"""Broker config and CLI: the example file documents every key, flags override it."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fastmqtt import __version__
from fastmqtt.broker.cli import build_parser, config_from_args
from fastmqtt.broker.config import BrokerConfig, config_from_dict, load_config

EXAMPLE = Path(__file__).parent.parent / "examples" / "fastmqtt.toml"


def test_example_documents_every_key_with_its_default():
    text = EXAMPLE.read_text()
    keys = {f.name for f in dataclasses.fields(BrokerConfig)} - {"listeners"}
    assert [k for k in sorted(keys) if f"{k} =" not in text] == []
    assert load_config(str(EXAMPLE)) == BrokerConfig()


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="max_qeued"):
        config_from_dict({"max_qeued": 3})


def test_listener_tables():
    cfg = config_from_dict({"listener": [{"type": "ws", "port": 9001, "path": "/mqtt"}]})
    (lc,) = cfg.listener_configs()
    assert (lc.type, lc.port, lc.path) == ("ws", 9001, "/mqtt")


def test_flags_override_file(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text('port = 1999\ndurability = "batch"\nmax_keepalive = 100\n')
    args = build_parser().parse_args(["-c", str(f), "-p", "0", "--max-keepalive", "30",
                                      "--no-persistence", "--ws-port", "9001"])
    cfg = config_from_args(args)
    assert cfg.port == 0 and cfg.max_keepalive == 30 and cfg.durability == "batch"
    assert cfg.persistence is False
    assert [lc.type for lc in cfg.listener_configs()] == ["tcp", "ws"]


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "fastmqtt.broker", "--version"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"fastmqtt-broker {__version__}"
