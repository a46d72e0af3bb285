"""An EdgeRollout over 600 devices stays correct and cheap through a sequence of changes.

A real ControllerCore and Mosquitto; the devices are registered as the ingest registers
them (a Heartbeat per device through ``core.ingest.handle``, serving v1), and move the same
way (UpdateStatus, heartbeats, presence). The rollout of v2 is applied, half the devices
commit, one device is lost (it comes back as another board class: out of the selector),
one goes offline, one new device appears (a late join). After each step the status
counters are exact, the capped per-device detail adds up, every owned device has one
target, and a pass with nothing changed runs a few bulk statements, not one per device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlmodel import Session, select

from controller.fleet.models import DeviceRollout, DeviceTarget
from controller.reconcile.rollout_status import DEVICE_DETAIL_LIMIT
from controller.reconcile.rollouts import reconcile_rollout
from protos import topics
from protos.edgefleet.v1 import common_pb2, device_pb2, update_pb2
from tests.helpers.controller import edge_rollout, ready_model, rollout_status, started_core
from tests.helpers.controller import wait_until as _wait

N = 600
CLASS = "cpu-x86-64"


def _hb(dev: str, sha: str, version: int, *, cls: str = CLASS, seq: int = 1) -> bytes:
    m = device_pb2.ServedModel(name="m", version=version, sha256=sha, active=True, slot="a")
    return device_pb2.Heartbeat(device_id=dev, device_class=cls, agent_version="t",
                                health="ok", seq=seq, uptime_s=3600,
                                sent_at_ms=int(time.time() * 1000), models=[m],
                                slots=[m]).SerializeToString()


def _send(core: Any, dev: str, leaf: str, payload: bytes) -> None:
    core.ingest.handle(topics.device_topic(dev, leaf), payload)


def _check(st: dict[str, Any], *, targeted: int, updated: int) -> None:
    """Exact counters; the capped detail map adds up to them."""
    assert st["targeted"] == targeted and st["updated"] == updated, st.get("message")
    assert st["failed"] == 0
    assert st["updated"] + st["inProgress"] + st["pending"] + st["stalled"] == targeted
    detail = st["deviceDetail"]
    assert detail["total"] == targeted + st["superseded"]
    assert sum(detail["byState"].values()) == detail["total"]
    assert detail["byState"].get("updated", 0) == updated
    assert len(st["devices"]) == detail["shown"] == min(detail["total"], DEVICE_DETAIL_LIMIT)
    assert detail["omitted"] == detail["total"] - detail["shown"]
    assert len(json.dumps(st)) < 120_000


def _targets(core: Any) -> dict[str, DeviceTarget]:
    with Session(core.db) as s:
        return {t.device_id: t for t in s.exec(select(DeviceTarget)).all()}


async def test_600_device_rollout_through_changes(tmp_path: Path, mosquitto) -> None:
    async with started_core(tmp_path / "c", mosquitto, chunk_size_bytes=4096,
                            resync_s=3600.0) as core:
        v1 = await ready_model(core, tmp_path, version=1, marker=1.0)
        ids = [f"d{i:04d}" for i in range(N)]
        for d in ids:
            _send(core, d, topics.HEARTBEAT, _hb(d, v1, 1))
        v2 = await ready_model(core, tmp_path, version=2, marker=2.0)
        core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}])])

        async def status_with(pred: Any, what: str) -> dict[str, Any]:
            return await _wait(lambda: (x := rollout_status(core)) and pred(x) and x,  # type: ignore[no-any-return]
                               timeout_s=180, what=what)

        # 1. applied: every device targeted and offered one shared delta
        st = await status_with(lambda x: x.get("inProgress") == N, "all offered")
        _check(st, targeted=N, updated=0)
        assert st["deviceDetail"]["byState"] == {"offered": N}
        with Session(core.db) as s:
            rows = {r.device_id: r for r in s.exec(select(DeviceRollout)).all()}
        assert set(rows) == set(ids) and len({r.update_id for r in rows.values()}) == N
        assert len({(r.codec, r.payload_size) for r in rows.values()}) == 1

        # 2. half the devices commit and report v2
        half = ids[: N // 2]
        for d in half:
            _send(core, d, topics.UPDATE_STATUS, update_pb2.UpdateStatus(
                device_id=d, update_id=rows[d].update_id, model_name="m", version=2,
                state=common_pb2.UPDATE_STATE_COMMITTED,
                at_ms=int(time.time() * 1000)).SerializeToString())
            _send(core, d, topics.HEARTBEAT, _hb(d, v2, 2, seq=2))
        st = await status_with(lambda x: x.get("updated") == N // 2, "half updated")
        _check(st, targeted=N, updated=N // 2)
        targets = _targets(core)
        assert len(targets) == N and all(t.target_sha256 == v2 for t in targets.values())
        assert all(targets[d].reached_ms for d in half)
        assert not any(targets[d].reached_ms for d in ids[N // 2:])

        # a pass with nothing changed: a few bulk statements, the same status
        statements = [0]

        def count(*_a: Any) -> None:
            statements[0] += 1

        event.listen(core.db, "before_cursor_execute", count)
        try:
            again = await reconcile_rollout(core.get("EdgeRollout", "default", "r"),
                                            core.rollout_context())
        finally:
            event.remove(core.db, "before_cursor_execute", count)
        assert statements[0] < 60, statements[0]
        assert {k: again[k] for k in ("targeted", "updated", "inProgress", "deviceDetail")} \
            == {k: st[k] for k in ("targeted", "updated", "inProgress", "deviceDetail")}

        # 3. one device is lost (re-flashed as another class), one goes offline
        lost, offline = ids[-1], ids[-2]
        _send(core, lost, topics.HEARTBEAT, _hb(lost, v1, 1, cls="other-class", seq=3))
        _send(core, offline, topics.PRESENCE, device_pb2.Presence(
            device_id=offline, online=False, reason="lwt").SerializeToString())
        st = await status_with(lambda x: x.get("targeted") == N - 1, "device lost")
        _check(st, targeted=N - 1, updated=N // 2)

        # 4. a new device appears serving v1: it joins the open wave and is offered
        new = "d9999"
        _send(core, new, topics.HEARTBEAT, _hb(new, v1, 1))
        st = await status_with(lambda x: x.get("targeted") == N, "new device joined")
        _check(st, targeted=N, updated=N // 2)
        targets = _targets(core)
        assert targets[new].target_sha256 == v2 and targets[new].rollout == "default/r"
        await _wait(lambda: _offered(core, new), timeout_s=60, what="new device offered")
        # the failed/in-flight devices come first in the capped detail; counts stay exact
        assert st["deviceDetail"]["byState"].get("updated") == N // 2
        assert all(v["state"] != "updated" for v in st["devices"].values())


def _offered(core: Any, dev: str) -> bool:
    with Session(core.db) as s:
        return s.exec(select(DeviceRollout).where(DeviceRollout.device_id == dev)).first() \
            is not None
