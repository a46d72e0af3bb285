"""`edgefleet demo --exit-when-ready` as a user runs it: a subprocess that must reach 3/3 serving.

The demo starts its own Mosquitto, controller, dashboard and three agent processes, applies
manifests/examples/ (whose canary wave soaks for 30 s) and exits 0 once all agents serve.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers.broker import mosquitto_path

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def test_demo_reaches_all_serving(tmp_path: Path) -> None:
    if not mosquitto_path():
        pytest.skip("mosquitto is not installed (the test command installs it with apt)")
    script = Path(sys.executable).with_name("edgefleet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "controller.cli"]
    data = tmp_path / "demo"
    res = subprocess.run([*cmd, "demo", "--exit-when-ready", "--port", "0", "--data-dir",
                          str(data), "--timeout", "240"], capture_output=True, text=True,
                         timeout=280, cwd=REPO)
    out = res.stdout
    assert res.returncode == 0, f"{out[-4000:]}\n{res.stderr[-4000:]}"
    m = re.search(r"3/3 serving digits@(\d+): ([0-9.]+) s from apply to all serving", out)
    assert m, out[-4000:]
    assert int(m.group(1)) >= 1
    # every agent answered an inference with the predicted class
    assert len(re.findall(r"inference on demo-\d .*predicted \d", out)) == 3, out[-3000:]
    assert "dashboard: http://127.0.0.1:" in out
    # the demo stopped its children: no agent or broker process still uses its folder
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if any(str(data) in (a or "") for a in (p.info["cmdline"] or []))]
    assert left == []
    assert (data / ".edgefleet-demo").is_file()


def test_demo_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("user data")
    from controller.demo import fresh_data_dir

    with pytest.raises(RuntimeError, match="not made by the demo"):
        fresh_data_dir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "user data"
