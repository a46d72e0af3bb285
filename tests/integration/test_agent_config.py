"""Agent configuration: the documented example loads, bad configs fail with a clear error,
``edgefleet-agent enroll`` writes a config that loads, and ``status`` works offline."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from agent.cli import main
from agent.config import ConfigError, config_from_dict, load_config

ROOT = base64.b64encode(bytes(range(32))).decode()
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "agent-config.example.yaml"


def base() -> dict:
    return {"device_id": "dev-1", "device_class": "cpu-x86",
            "trust": {"root_public_key": ROOT}}


def test_documented_example_loads_with_defaults(tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["trust"]["root_public_key"] = ROOT
    cfg = config_from_dict(data)
    assert cfg.heartbeat_interval_s == 10.0 and cfg.serve.host == "127.0.0.1"
    assert cfg.limits.max_chunk_bytes == 256 * 1024


@pytest.mark.parametrize("patch, message", [
    ({"device_id": "Bad Id"}, "device_id"),
    ({"trust": {"root_public_key": "not base64!"}}, "root_public_key"),
    ({"trust": {"root_public_key": base64.b64encode(b"short").decode()}}, "32 raw bytes"),
    ({"mqtt": {"hots": "x"}}, "unknown key"),
    ({"limits": {"max_update_bytes": 0}}, "max_update_bytes"),
    ({"mqtt": {"port": "1883"}}, "integer"),
])
def test_bad_config_is_a_clear_error(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**base(), **patch})


def test_enroll_writes_a_loadable_config_and_status_reads_state(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "agent.yaml"
    rc = main(["enroll", "--device-id", "board-7", "--device-class", "rk3588",
               "--root-public-key", ROOT, "--data-dir", str(tmp_path / "data"),
               "--out", str(out)])
    assert rc == 0
    cfg = load_config(out)
    assert (cfg.device_id, cfg.device_class, cfg.trust.root_public_key) == (
        "board-7", "rk3588", ROOT)
    capsys.readouterr()
    assert main(["status", "--config", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "device_id": "board-7", "device_class": "rk3588", "models": {}}
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
