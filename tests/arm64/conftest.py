"""Fixtures of the emulated-arm64 tests (tests/arm64/test_*.py run INSIDE the arm64 chroot).

``scripts/arm64/run-tests.sh`` sets EDGEFLEET_ARM64_FIXTURES (files built on the x86_64 host by
tests/arm64/prepare_fixtures.py), EDGEFLEET_ARM64_RESULTS and EDGEFLEET_ARM64_MQTT_PORT (the
host's Mosquitto). Without EDGEFLEET_ARM64_FIXTURES these tests are not collected, so the main
x86_64 suite leaves them alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

if not os.environ.get("EDGEFLEET_ARM64_FIXTURES"):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return Path(os.environ["EDGEFLEET_ARM64_FIXTURES"])


@pytest.fixture(scope="session")
def index(fixtures_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((fixtures_dir / "fixtures.json").read_text())
    return data


@pytest.fixture(scope="session")
def results_dir() -> Path:
    out = Path(os.environ.get("EDGEFLEET_ARM64_RESULTS", "/tmp/arm64-results"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="session")
def mqtt_port() -> int:
    port = os.environ.get("EDGEFLEET_ARM64_MQTT_PORT")
    if not port:
        pytest.fail("EDGEFLEET_ARM64_MQTT_PORT is not set (run scripts/arm64/run-tests.sh)")
    return int(port)
