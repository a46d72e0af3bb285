"""Deleting resources in embedded mode (ControllerCore.delete -> controller.reconcile.cleanup).

A rollout over two stand-in devices, one committed and one mid-way (it never requests
chunks): deleting the EdgeRollout clears the mid-way device's retained offer (a fresh
subscriber gets none), refuses its later ChunkRequest, cancels its row, keeps the committed
device serving the model (its DesiredState still names it), drops the rollout's rate lane,
writes an Event and removes the Resource row; running the finalizer again changes nothing.
Deleting an EdgeModel reports the rollouts that reference it (ModelNotFound).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from controller.fleet.models import Device, DeviceDesired, DeviceRolloutState, Event, Resource
from controller.reconcile.cleanup import finalize_model, finalize_rollout
from protos import topics
from tests.helpers.controller import (
    edge_rollout,
    mqtt_client,
    ready_model,
    registered_devices,
    rollout_rows,
    wait_sync,
    wait_until,
)
from tests.helpers.controller import started_core as started

FAST = {"chunk_size_bytes": 4096, "ota_max_bytes_per_second": 256 * 1024}


def retained_offer(port: int, device_id: str) -> bytes | None:
    """The retained message on the device's offer topic as a fresh subscriber sees it (None:
    none). A marker published after the SUBACK arrives after any retained message."""
    got: list[bytes] = []
    done = threading.Event()
    c = mqtt_client(port, f"probe-{device_id}")
    marker = f"test/probe/{device_id}"

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.topic == marker:
            done.set()
        elif msg.retain and msg.payload:
            got.append(bytes(msg.payload))

    c.on_message = on_message
    subscribed = threading.Event()
    c.on_subscribe = lambda *_a: subscribed.set()
    c.subscribe([(topics.device_topic(device_id, topics.OFFER), 1),
                 (topics.device_topic(device_id, topics.OFFERS), 1), (marker, 1)])
    wait_sync(subscribed.is_set, what="subscribed")
    c.publish(marker, b"x", qos=1)
    wait_sync(done.is_set, what="marker")
    c.loop_stop()
    c.disconnect()
    return got[0] if got else None


def _events(core: Any, kind: str) -> list[Event]:
    with Session(core.db) as s:
        return list(s.exec(select(Event).where(Event.kind == kind,
                                               Event.reason == "Deleted")).all())


async def test_delete_rollout_withdraws_offers_keeps_committed(tmp_path: Path,
                                                               mosquitto: Any) -> None:
    async with started(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        done = await registered_devices(core, mosquitto.port, ["dev-a"])
        [slow] = (await registered_devices(core, mosquitto.port, ["dev-b"],
                                           auto_fetch=False)).values()
        core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}],
                                 maxBytesPerSecond=1 << 20)])
        await wait_until(lambda: done["dev-a"].committed and slow.offers
                         and rollout_rows(core)["dev-a"].state == DeviceRolloutState.COMMITTED,
                         timeout_s=60, what="dev-a committed, dev-b offered")
        [offer] = slow.offers
        assert retained_offer(mosquitto.port, "dev-b") is not None
        assert "default/r" in core.publisher.lanes
        res = core.get("EdgeRollout", "default", "r")

        assert core.delete("EdgeRollout", "default", "r")

        def gone() -> bool:
            with Session(core.db) as s:
                return s.exec(select(Resource).where(Resource.kind == "EdgeRollout")).first() is None

        await wait_until(gone, what="rollout finalized and removed")
        assert core.get("EdgeRollout", "default", "r") is None
        assert retained_offer(mosquitto.port, "dev-b") is None
        rows = rollout_rows(core)
        assert rows["dev-b"].state == DeviceRolloutState.CANCELLED
        assert rows["dev-a"].state == DeviceRolloutState.COMMITTED
        assert "default/r" not in core.publisher.lanes
        # the mid-way device asks for chunks anyway: refused, nothing sent
        before = core.publisher.rejected_requests
        slow.request(offer, [0])
        await wait_until(lambda: core.publisher.rejected_requests > before, what="refused")
        assert not [c for c in slow.chunks_seen if c[0] == offer.update_id]
        with Session(core.db) as s:
            dev_a = s.get(Device, "dev-a")
            assert dev_a is not None and [m["name"] for m in dev_a.models] == ["m"]
            desired = {d.device_id: d for d in s.exec(select(DeviceDesired)).all()}
        assert [m["name"] for m in desired["dev-a"].models] == ["m"]   # never uninstalled
        assert desired["dev-b"].models == [] and not desired["dev-b"].offer_update_id
        assert len(_events(core, "EdgeRollout")) == 1

        # a second run (crash between finalize and row removal) changes nothing
        again = await finalize_rollout(res, core.cleanup_context())
        assert again["cancelled"] == 0
        assert len(_events(core, "EdgeRollout")) == 1
        assert rollout_rows(core)["dev-b"].state == DeviceRolloutState.CANCELLED
        for d in (*done.values(), slow):
            d.close()


async def test_delete_model_reports_rollouts(tmp_path: Path, mosquitto: Any) -> None:
    async with started(tmp_path / "c", mosquitto, **FAST) as core:
        await ready_model(core, tmp_path)
        core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}])])
        await wait_until(lambda: (core.get("EdgeRollout", "default", "r")["status"]
                                  .get("phase")), what="rollout status")
        res = core.get("EdgeModel", "default", "m")
        assert core.delete("EdgeModel", "default", "m")
        await wait_until(lambda: "does not exist" in str(
            core.get("EdgeRollout", "default", "r")["status"].get("message")),
            what="rollout reports ModelNotFound")
        [ev] = await wait_until(lambda: _events(core, "EdgeModel"), what="event")
        assert ev.type == "Warning" and "default/r" in ev.message
        assert await finalize_model(res, core.cleanup_context()) == ["default/r"]
        assert len(_events(core, "EdgeModel")) == 1
