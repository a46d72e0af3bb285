"""Shared pytest fixtures: a real Mosquitto broker per test, temporary data folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.broker import Broker, mosquitto_path, start_mosquitto
from tests.helpers.components import missing


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto broker on a free loopback port, stopped after the test."""
    if not mosquitto_path():
        missing("mosquitto is not installed (the test command installs it with apt)")
    broker = start_mosquitto(tmp_path / "broker")
    try:
        yield broker
    finally:
        broker.stop()
