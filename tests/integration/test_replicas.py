"""Controller replicas sharing one PostgreSQL: the database lease and shared ingest.

A throwaway PostgreSQL server (tests/helpers/postgres.py), the real Mosquitto fixture and
paho stand-in devices (tests/helpers/controller.py):

- two DbLease campaigns (controller/fleet/lease.py): exactly one leader; a killed leader
  (task cancelled, nothing released) is replaced after expiry; a clean stop hands over;
- a leader whose database goes away (connections killed) or hangs (a stalled TCP proxy in
  front of PostgreSQL) steps down while its lease row is still valid, before anyone else
  could take it;
- two real ControllerCore replicas (shared keys and store folders, own data folders, one
  database): heartbeats are split between them by the MQTT 5 shared subscription and all land
  in the database; only the leader runs reconcile passes (also for a resource applied on
  the follower); the leader killed mid-rollout -> the other takes over and the rollout
  completes with every device's state intact;
- two ``edgefleet up --db-url ... --broker-url ...`` processes: one leader; SIGTERM hands over.

One PostgreSQL server serves the module (a fresh database per test). Skipped when PostgreSQL
or Mosquitto is missing, except under CI (``CI=true``), where a missing server fails the
tests instead of skipping them silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from sqlmodel import select as sql_select

from controller.core import ControllerCore
from controller.embedded import stand_down
from controller.fleet.db import make_engine
from controller.fleet.lease import DbLease, db_now_ms, read_lease
from controller.fleet.models import Device, DeviceRollout
from controller.ota.keys import KeyStore
from controller.settings import Settings
from protos import topics
from protos.edgefleet.v1 import common_pb2
from tests.helpers.broker import Broker
from tests.helpers.controller import (
    FakeDevice,
    edge_rollout,
    ready_model,
    rollout_rows,
    rollout_status,
    wait_until,
)
from tests.helpers.postgres import postgres_or_missing

pytestmark = pytest.mark.postgres
REPO = Path(__file__).resolve().parents[2]
FAST = {"chunk_size_bytes": 4096, "ota_max_bytes_per_second": 1024 * 1024}


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    """One throwaway PostgreSQL server for the module (starting a server per test would take
    most of the time budget)."""
    yield from postgres_or_missing()


@pytest.fixture
def postgres_url(pg_server: str) -> Iterator[str]:
    """A fresh database on the module's server, dropped after the test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    port = _port_of(pg_server)
    with psycopg.connect(host="127.0.0.1", port=port, user="edgefleet", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(host="127.0.0.1", port=port, user="edgefleet", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- helpers ------------------------------------------------------------------------------------
class TcpProxy:
    """A loopback TCP proxy in front of PostgreSQL that can kill or stall its connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"                     # pass | stall | refuse
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._lsock.getsockname()[1])
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="pg-proxy").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                c, _ = self._lsock.accept()
            except OSError:
                return
            if self.mode == "refuse":
                c.close()
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._pairs.append((c, u))
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self._closed:
                if self.mode == "stall":
                    time.sleep(0.05)           # bytes wait in the kernel: a hung server
                    continue
                r, _, _ = select.select([a, b], [], [], 0.1)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def kill(self) -> None:
        """Close every connection and refuse new ones (the database is unreachable)."""
        self.mode = "refuse"
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()

    def close(self) -> None:
        self._closed = True
        self.kill()
        with contextlib.suppress(OSError):
            self._lsock.close()


def _port_of(url: str) -> int:
    m = re.search(r"@127\.0\.0\.1:(\d+)/", url)
    assert m, url
    return int(m.group(1))


def _leaders(leases: list[DbLease]) -> list[DbLease]:
    now = [x for x in leases if x.is_leader]
    assert len(now) <= 1, f"two leaders at once: {[x.identity for x in now]}"
    return now


async def _one_leader(leases: list[DbLease], *, timeout_s: float = 20.0) -> DbLease:
    got = await wait_until(lambda: _leaders(leases), timeout_s=timeout_s, what="one leader")
    return got[0]


@contextlib.contextmanager
def _engine(url: str) -> Iterator[Engine]:
    e = make_engine(url)
    try:
        yield e
    finally:
        e.dispose()


# -- the lease alone ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_two_leases_one_leader_and_takeover(request: pytest.FixtureRequest,
                                                  tmp_path: Path, backend: str) -> None:
    url = request.getfixturevalue("postgres_url") if backend == "postgres" \
        else f"sqlite:///{tmp_path / 'lease.db'}"
    gained: list[str] = []
    lost: list[tuple[str, str]] = []
    with _engine(url) as ea, _engine(url) as eb:
        leases = [DbLease(e, identity=i, lease_s=1.5, renew_s=0.3,
                          on_gained=lambda i=i: gained.append(i),
                          on_lost=lambda r, i=i: lost.append((i, r)))
                  for e, i in ((ea, "a"), (eb, "b"))]
        tasks = {x.identity: asyncio.create_task(x.run()) for x in leases}
        try:
            first = await _one_leader(leases)
            other = next(x for x in leases if x is not first)
            for _ in range(8):                     # several renewals: still exactly one
                assert _leaders(leases) == [first]
                await asyncio.sleep(0.1)
            row = read_lease(ea)
            assert row is not None and row.holder == first.identity and row.transitions == 1
            # the leader is killed: nothing released, the other waits for the expiry
            tasks[first.identity].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tasks[first.identity]
            assert not first.is_leader and read_lease(ea).holder == first.identity
            assert await _one_leader(leases) is other
            row = read_lease(ea)
            assert row.holder == other.identity and row.transitions == 2
            # the first one campaigns again and stays a follower while the other renews
            tasks[first.identity] = asyncio.create_task(first.run())
            for _ in range(6):
                assert _leaders(leases) == [other]
                await asyncio.sleep(0.1)
            # a clean stop releases: the first takes over (no expiry needed)
            await other.stop(tasks.pop(other.identity))
            assert not other.is_leader
            assert await _one_leader([first]) is first
            assert read_lease(ea).holder == first.identity
            assert gained == [first.identity, other.identity, first.identity]
            assert [i for i, _ in lost] == [first.identity, other.identity]
        finally:
            for x in leases:
                await x.stop(tasks.get(x.identity))


@pytest.mark.parametrize("failure", ["killed", "stalled"])
async def test_leader_steps_down_before_its_lease_expires(
        postgres_url: str, failure: str) -> None:
    proxy = TcpProxy(_port_of(postgres_url))
    proxied = postgres_url.replace(f":{_port_of(postgres_url)}/", f":{proxy.port}/")
    # what the database said when the leader stepped down: (db now, lease expiry, b leads)
    at_loss: list[tuple[int, int, bool]] = []
    with _engine(postgres_url) as direct, _engine(proxied) as via_proxy:
        b: DbLease | None = None

        def on_lost(_reason: str) -> None:
            with direct.connect() as conn:
                now = db_now_ms(conn)
            row = read_lease(direct)
            at_loss.append((now, row.expires_ms if row else 0, bool(b and b.is_leader)))

        a = DbLease(via_proxy, identity="a", lease_s=3.0, renew_s=0.75, on_lost=on_lost)
        b = DbLease(direct, identity="b", lease_s=3.0, renew_s=0.75)
        ta = asyncio.create_task(a.run())
        tb: asyncio.Task[None] | None = None
        try:
            await wait_until(lambda: a.is_leader, timeout_s=20, what="a leads")
            tb = asyncio.create_task(b.run())
            await asyncio.sleep(1.0)              # b has tried and lost at least once
            assert _leaders([a, b]) == [a]
            if failure == "killed":
                proxy.kill()
            else:
                proxy.mode = "stall"
            await wait_until(lambda: at_loss, timeout_s=20, what="a steps down")
            assert not a.is_leader
            db_now, expires_ms, b_leads = at_loss[0]
            assert db_now < expires_ms, "a stepped down only after its lease could expire"
            assert not b_leads
            assert a.last_error
            # the other replica takes over once the row expired; a stays a follower
            assert await _one_leader([a, b]) is b
            assert read_lease(direct).holder == "b"
            proxy.mode = "pass"                    # the database is back for a (stall case)
            for _ in range(5):
                assert _leaders([a, b]) == [b]
                await asyncio.sleep(0.1)
        finally:
            proxy.close()                          # a hung attempt fails now
            await a.stop(ta)
            await b.stop(tb)


# -- real controller replicas -------------------------------------------------------------------
class Replica:
    """A ControllerCore with a DbLease, as controller/embedded.py wires them."""

    def __init__(self, name: str, root: Path, broker: Broker, db_url: str) -> None:
        self.name = name
        self.settings = Settings(data_dir=root / name, mqtt_host=broker.host,
                                 mqtt_port=broker.port, db_url=db_url,
                                 keys_dir=root / "shared" / "keys",
                                 store_dir=root / "shared" / "store", resync_s=0.5,
                                 compile_in_process_pool=False, replica_id=name, **FAST)
        self.core: Any = None
        self.lease: DbLease | None = None
        self.task: asyncio.Task[None] | None = None
        self.lease_engine: Engine | None = None
        self.heartbeats = 0                    # heartbeats this replica's ingest received

    async def start(self) -> Replica:
        core = self.core = ControllerCore(self.settings)
        # count what this replica's MQTT client hands to the ingest (submit when it batches)
        entry = "submit" if hasattr(core.ingest, "submit") else "handle"
        inner = getattr(core.ingest, entry)

        def counting(topic: str, payload: bytes, *, retained: bool = False) -> Any:
            if topic.endswith("/" + topics.HEARTBEAT):
                self.heartbeats += 1
            return inner(topic, payload, retained=retained)

        setattr(core.ingest, entry, counting)
        self.lease_engine = make_engine(self.settings.resolved_db_url)
        self.lease = DbLease(self.lease_engine, identity=self.name, lease_s=3.0, renew_s=0.75,
                             on_gained=core.kick, on_lost=lambda _r: stand_down(core))
        core.leader = self.lease
        self.task = asyncio.create_task(self.lease.run())
        await core.start()
        await asyncio.wait_for(core.connected.wait(), 15)
        return self

    async def crash(self) -> None:
        """Killed: the lease task is cancelled (nothing released), the core's tasks too."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None
        await self.core.stop()

    async def stop(self) -> None:
        if self.task is not None:
            assert self.lease is not None
            await self.core.stop()
            await self.lease.stop(self.task)
            self.task = None
        if self.lease_engine is not None:
            self.lease_engine.dispose()
            self.lease_engine = None


async def test_replicas_share_ingest_and_one_leader_reconciles(
        tmp_path: Path, mosquitto: Broker, postgres_url: str) -> None:
    KeyStore.load_or_init(tmp_path / "shared" / "keys")
    r0 = await Replica("r0", tmp_path, mosquitto, postgres_url).start()
    replicas = [r0]
    devs: dict[str, FakeDevice] = {}
    try:
        await wait_until(lambda: r0.lease.is_leader, timeout_s=20, what="r0 leads")
        r1 = await Replica("r1", tmp_path, mosquitto, postgres_url).start()
        replicas.append(r1)
        leases = [r.lease for r in replicas]
        assert r0.core.keys.root_public_raw() == r1.core.keys.root_public_raw()

        # shared ingest: each heartbeat reaches one replica; all land in the one database
        root = r0.core.keys.root_public_raw()
        ids = [f"rep-{i}" for i in range(4)]
        devs = {i: FakeDevice(i, mosquitto.port, root, auto_fetch=False) for i in ids}
        for _ in range(4):
            for d in devs.values():
                d.heartbeat()

        def all_known() -> bool:
            with Session(r1.core.db) as s:
                return all(s.get(Device, i) is not None for i in ids)

        await wait_until(all_known, what="devices in the shared database")
        await wait_until(lambda: r0.heartbeats + r1.heartbeats >= 16, what="heartbeats")
        assert r0.heartbeats + r1.heartbeats == 16      # shared: never delivered twice
        assert r0.heartbeats and r1.heartbeats, "the shared subscription split nothing"

        # applied on the follower, compiled and rolled out by the leader only
        await ready_model(r1.core, tmp_path)
        r1.core.apply([edge_rollout("r", "m", [{"name": "all", "percent": 100}],
                                    selector={"devices": ids})])
        await wait_until(lambda: all(d.offers for d in devs.values()), timeout_s=60,
                         what="offers to every device")
        st = await wait_until(lambda: (x := rollout_status(r1.core)).get("phase")
                              == "Progressing" and x, what="rollout status written")
        assert st["targeted"] == len(ids) and st.get("updated", 0) == 0
        assert _leaders(leases) == [r0.lease]
        assert r1.core.reconcile_count == 0 and r0.core.reconcile_count > 0
        uid = r1.core.get("EdgeRollout", "default", "r")["metadata"]["uid"]

        # the leader is killed mid-rollout; the devices download from the survivor
        await r0.crash()
        replicas.remove(r0)
        await r0.stop()
        for d in devs.values():
            d.auto_fetch = True
            for m in d.offers:
                d.status(m, common_pb2.UPDATE_STATE_DOWNLOADING)
                d.request(m, list(range(min(d.window, len(m.chunk_sha256)))))
        await wait_until(lambda: r1.lease.is_leader, timeout_s=20, what="r1 takes over")
        st = await wait_until(lambda: (x := rollout_status(r1.core)).get("phase") == "Complete"
                              and x, timeout_s=60, what="rollout complete after failover")
        assert st["updated"] == len(ids) and st["targeted"] == len(ids)
        assert r1.core.get("EdgeRollout", "default", "r")["metadata"]["uid"] == uid
        rows = rollout_rows(r1.core)
        assert set(rows) == set(ids)
        assert all(r.state == "committed" and r.bytes_sent >= r.payload_size > 0
                   for r in rows.values())
        assert all(len(d.offers) == 1 and d.committed == [d.offers[0].update_id]
                   for d in devs.values())
        assert r1.core.reconcile_count > 0
        row = read_lease(r1.core.db)
        assert row is not None and row.holder == "r1" and row.transitions == 2
        with Session(r1.core.db) as s:
            assert {d.device_id for d in s.exec(sql_select(Device)).all()} == set(ids)
            assert len(s.exec(sql_select(DeviceRollout)).all()) == len(ids)
    finally:
        for d in devs.values():
            d.close()
        for r in replicas:
            await r.stop()


# -- `edgefleet up` replicas as processes -------------------------------------------------------
def _up(name: str, root: Path, db_url: str, broker: Broker) -> tuple[subprocess.Popen[str], Path]:
    log = root / f"{name}.log"
    cmd = [sys.executable, "-m", "controller.cli", "up", "--data-dir", str(root / name),
           "--port", "0", "--db-url", db_url, "--broker-url", broker.url,
           "--replica-id", name, "--lease-seconds", "3",
           "--keys-dir", str(root / "shared" / "keys"),
           "--store-dir", str(root / "shared" / "store")]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                stdin=subprocess.DEVNULL, env=dict(os.environ,
                                                                   PYTHONUNBUFFERED="1"))
    return proc, log


async def _api_url(proc: subprocess.Popen[str], log: Path) -> str:
    def found() -> str | None:
        assert proc.poll() is None, f"edgefleet up exited:\n{log.read_text()[-3000:]}"
        m = re.search(r"dashboard (http://\S+)", log.read_text(errors="replace"))
        return m.group(1) if m else None

    url = str(await wait_until(found, timeout_s=40, what="edgefleet up started"))

    async def ready() -> bool:
        try:
            async with httpx.AsyncClient(timeout=2) as c:
                return (await c.get(f"{url}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + 30
    while not await ready():
        assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.1)
    return url


async def test_edgefleet_up_replicas(tmp_path: Path, mosquitto: Broker,
                                     postgres_url: str) -> None:
    KeyStore.load_or_init(tmp_path / "shared" / "keys")
    procs = {n: _up(n, tmp_path, postgres_url, mosquitto) for n in ("a", "b")}
    try:
        urls = {n: await _api_url(p, log) for n, (p, log) in procs.items()}
        with _engine(postgres_url) as e:
            def holder() -> str:
                row = read_lease(e)
                return row.holder if row and row.holder in procs else ""

            leader = await wait_until(holder, timeout_s=20, what="a leader")
            other = "b" if leader == "a" else "a"
            async with httpx.AsyncClient(timeout=5) as c:   # every replica serves the API
                for url in urls.values():
                    assert (await c.get(f"{url}/healthz")).status_code == 200
            # SIGTERM: a clean stop releases the lease; the other takes it
            p, log = procs[leader]
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0, log.read_text()[-3000:]
            assert f"replica {leader} released lease" in log.read_text()
            await wait_until(lambda: holder() == other, timeout_s=20, what="handover")
            assert "is now the leader" in procs[other][1].read_text()
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
