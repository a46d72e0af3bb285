"""The dashboard in a real browser (headless Chromium) over a real fleet.

Two real agents take a rollout through a real Mosquitto; Chromium then loads the fleet page
and a device page. ``--virtual-time-budget`` lets the page's own script run its 2 s polls, so
the device page's live-metrics table (filled only by JavaScript from the JSON API) proves the
script works in a browser. A screenshot of the fleet page is written as PNG.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from controller.models.digits import build_digits_cnn
from tests.e2e.fleet import Fleet, edgefleet_cli, start_fleet, wait_for, write_manifests
from tests.helpers.broker import Broker

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    exe = chromium_path()
    assert exe
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900",
         *extra, url], capture_output=True, text=True, timeout=90)


def rows_by_device(dom: str) -> dict[str, str]:
    """device id -> the text of its row in the devices table."""
    out = {}
    for m in re.finditer(r'<tr data-device="([^"]+)">(.*?)</tr>', dom, re.S):
        out[m.group(1)] = re.sub(r"<[^>]+>", " ", m.group(2))
    return out


async def test_dashboard_in_chromium(mosquitto: Broker, tmp_path: Path) -> None:
    if not chromium_path():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    model = build_digits_cnn(tmp_path / "digits-cnn.onnx")
    manifests = tmp_path / "manifests"
    write_manifests(manifests, model=model)
    fleet: Fleet = await start_fleet(tmp_path, mosquitto, agents=2)
    try:
        repo = Path(__file__).resolve().parents[2]
        for folder in (repo / "manifests" / "deviceclasses", manifests):
            res = await edgefleet_cli("--server", fleet.url, "apply", "-f", str(folder))
            assert res.returncode == 0, res.stderr

        async def serving_with_metrics() -> dict[str, Any] | None:
            devs = await fleet.devices()
            ok = all(devs.get(a.device_id, {}).get("version") == 1 for a in fleet.agents)
            metrics = (await fleet.get("/api/v1/metrics"))["items"]
            have = {m["device_id"] for m in metrics}
            return devs if ok and {a.device_id for a in fleet.agents} <= have else None

        await wait_for(serving_with_metrics, timeout_s=120, what="2 agents serving digits@1 "
                       "with metrics", on_timeout=fleet.logs)

        profile = tmp_path / "chromium-profile"
        res = await asyncio.to_thread(chromium, f"{fleet.url}/", profile, "--dump-dom")
        assert res.returncode == 0, res.stderr[-2000:]
        rows = rows_by_device(res.stdout)
        assert set(rows) == {"board-1", "board-2"}, res.stdout[:3000]
        for text in rows.values():
            assert "digits@1" in text and "online" in text and "cpu-" in text, text
        assert "2/2 devices online" in res.stdout

        # the device page: its metrics table is written by dashboard.js from the JSON API
        res = await asyncio.to_thread(chromium, f"{fleet.url}/devices/board-1", profile,
                                      "--virtual-time-budget=6000", "--dump-dom")
        assert res.returncode == 0, res.stderr[-2000:]
        table = re.search(r'<table id="metrics">(.*?)</table>', res.stdout, re.S)
        assert table, res.stdout[:3000]
        assert "waiting for metrics" not in table.group(1), table.group(1)
        assert "digits@1" in table.group(1) or "(host)" in table.group(1), table.group(1)

        shot = tmp_path / "dashboard.png"
        res = await asyncio.to_thread(chromium, f"{fleet.url}/", profile,
                                      f"--screenshot={shot}", "--hide-scrollbars")
        assert res.returncode == 0, res.stderr[-2000:]
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        shot = tmp_path / "device.png"
        res = await asyncio.to_thread(chromium, f"{fleet.url}/devices/board-1", profile,
                                      "--virtual-time-budget=6000", f"--screenshot={shot}",
                                      "--hide-scrollbars")
        assert res.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG"
    finally:
        await fleet.stop()
