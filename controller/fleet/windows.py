"""Windowed serving metrics: cumulative agent counters -> per-window deltas, and their queries.

Agents report, per (model, version), request and error counters and a latency histogram that
are cumulative since the agent started (protos/edgefleet/v1/device.proto ``ModelMetrics``).
controller/fleet/ingest.py calls :func:`record` with every parsed ``Metrics`` message; it
differences each model's counters against the last snapshot of that (device, model, version)
and stores the delta as a :class:`MetricWindow` row covering (previous ``at_ms``, this
``at_ms``]. Read by the rollout health gates (:func:`window_stats`) and by the API and the
dashboard (:func:`recent_stats`, :func:`recent_stats_all`, :func:`list_windows`).

Snapshots are persisted (:class:`MetricSnapshot`, one row per (device, model, version) plus a
per-device marker row with ``model_name == ""`` stamped with the time of the device's last
message), not cached in memory: a restarted controller, or another replica taking the next
message of a shared subscription, differences against the same snapshot. Rules:

- no snapshot and no recent message of the device (first message ever, or after a silence of
  more than ``max_window_ms``): no window, only the snapshot. A restarted controller never
  produces one window spanning its downtime: the gap is longer than ``max_window_ms``, or the
  window is the true delta since the last message it stored;
- a (model, version) absent from the device's previous message (a new version loaded, the
  agent restarted): its counters all arrived after that message, so they are the window;
- a counter reset (requests, errors or any bucket lower than before, or the histogram bounds
  changed: the agent restarted) makes the new cumulative values the delta;
- a message not newer than the device's last one (replayed, out of order) makes no window and
  leaves the snapshots alone.

The pure functions (:func:`difference`, :func:`merge`, :func:`rebucket`, :func:`percentile`,
:func:`stats_of`) are unit-tested in tests/unit/test_windows.py.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, bindparam, delete
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col, select

log = logging.getLogger(__name__)

#: histograms with more buckets than this are ignored (requests and errors still count)
MAX_HISTOGRAM_BUCKETS = 256
#: a window longer than this is not recorded (the device or the controller was away)
MAX_WINDOW_MS = 10 * 60 * 1000
#: largest value a BigInteger column holds (agents send uint64)
MAX_COUNT = 2**63 - 1
MARKER = ""                       # model_name of the per-device "last message" snapshot


class MetricWindow(SQLModel, table=True):
    """The delta of one (device, model, version) between two consecutive Metrics messages."""

    __table_args__ = (
        Index("ix_metricwindow_model_device_end", "model_name", "model_version", "device_id",
              "end_ms"),
        Index("ix_metricwindow_device_end", "device_id", "end_ms"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str
    model_name: str
    model_version: int = Field(sa_type=BigInteger)
    start_ms: int = Field(sa_type=BigInteger)    # the previous message's at_ms
    end_ms: int = Field(sa_type=BigInteger, index=True)  # this message's at_ms
    requests: int = Field(default=0, sa_type=BigInteger)
    errors: int = Field(default=0, sa_type=BigInteger)
    bounds_ms: list[float] = Field(default_factory=list, sa_column=Column(JSON))
    counts: list[int] = Field(default_factory=list, sa_column=Column(JSON))  # [] = no samples
    sum_ms: float = 0.0
    buffered: bool = False        # sent late from the agent's offline buffer
    reset: bool = False           # the counters went down (agent restart)


class MetricSnapshot(SQLModel, table=True):
    """Last cumulative counters seen per (device, model, version); model "" = device marker."""

    device_id: str = Field(primary_key=True)
    model_name: str = Field(primary_key=True)
    model_version: int = Field(primary_key=True, sa_type=BigInteger,
                               sa_column_kwargs={"autoincrement": False})
    at_ms: int = Field(sa_type=BigInteger, index=True)
    requests: int = Field(default=0, sa_type=BigInteger)
    errors: int = Field(default=0, sa_type=BigInteger)
    bounds_ms: list[float] = Field(default_factory=list, sa_column=Column(JSON))
    counts: list[int] = Field(default_factory=list, sa_column=Column(JSON))
    sum_ms: float = 0.0


# -- pure functions ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Histogram:
    """Bucketed latencies: ``counts`` has len(bounds_ms) + 1 entries (last is +Inf), or none."""

    bounds_ms: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()
    sum_ms: float = 0.0

    @property
    def total(self) -> float:
        return float(sum(self.counts))


@dataclass(frozen=True)
class Counters:
    """One model's cumulative counters as an agent reports them."""

    requests: int = 0
    errors: int = 0
    latency: Histogram = Histogram()


@dataclass(frozen=True)
class Delta:
    """What happened between two snapshots; ``reset``: the counters started over."""

    requests: int
    errors: int
    latency: Histogram
    reset: bool = False


def checked_histogram(bounds_ms: Sequence[float], counts: Sequence[int],
                      sum_ms: float) -> tuple[Histogram, str]:
    """The histogram if well-formed, else an empty one and the reason it was refused."""
    if not bounds_ms and not any(counts):
        return Histogram(), ""
    if len(counts) != len(bounds_ms) + 1:
        return Histogram(), f"{len(counts)} counts for {len(bounds_ms)} bounds"
    if len(counts) > MAX_HISTOGRAM_BUCKETS:
        return Histogram(), f"{len(counts)} buckets exceeds {MAX_HISTOGRAM_BUCKETS}"
    b = tuple(float(x) for x in bounds_ms)
    if not all(math.isfinite(x) and x >= 0 for x in b) or any(
            hi <= lo for lo, hi in zip(b, b[1:], strict=False)):
        return Histogram(), "bounds are not finite, non-negative and increasing"
    s = float(sum_ms) if math.isfinite(sum_ms) and sum_ms >= 0 else 0.0
    return Histogram(b, tuple(min(int(c), MAX_COUNT) for c in counts), s), ""


def difference(prev: Counters, cur: Counters) -> Delta:
    """``cur - prev``; a counter that went down, or new bounds, means a reset: ``cur`` is the
    delta."""
    p, c = prev.latency, cur.latency
    reset = (cur.requests < prev.requests or cur.errors < prev.errors
             or p.bounds_ms != c.bounds_ms or len(p.counts) != len(c.counts)
             or any(b < a for a, b in zip(p.counts, c.counts, strict=True)))
    if reset:
        return Delta(cur.requests, cur.errors, c, reset=True)
    hist = Histogram(c.bounds_ms, tuple(b - a for a, b in zip(p.counts, c.counts, strict=True)),
                     max(0.0, c.sum_ms - p.sum_ms))
    return Delta(cur.requests - prev.requests, cur.errors - prev.errors, hist)


def rebucket(h: Histogram, bounds_ms: Sequence[float]) -> tuple[float, ...]:
    """``h``'s counts spread over other bucket bounds, in proportion to each bucket's overlap
    (the same linear assumption as :func:`percentile`); the +Inf bucket goes to the bucket
    just above its lower bound."""
    to = tuple(bounds_ms)
    out = [0.0] * (len(to) + 1)
    for i, c in enumerate(h.counts):
        if not c:
            continue
        lo = 0.0 if i == 0 else h.bounds_ms[i - 1]
        if i >= len(h.bounds_ms):
            out[bisect.bisect_right(to, lo)] += c
            continue
        hi = h.bounds_ms[i]
        if hi <= lo:
            out[bisect.bisect_left(to, hi)] += c
            continue
        for j in range(len(out)):
            tlo = 0.0 if j == 0 else to[j - 1]
            thi = to[j] if j < len(to) else math.inf
            overlap = min(hi, thi) - max(lo, tlo)
            if overlap > 0:
                out[j] += c * overlap / (hi - lo)
    return tuple(out)


def merge(hists: Iterable[Histogram]) -> Histogram:
    """Sum of histograms; ones with other bounds are rebucketed onto the bounds that hold the
    most samples."""
    hs = [h for h in hists if h.counts and h.total > 0]
    if not hs:
        return Histogram()
    weight: dict[tuple[float, ...], float] = {}
    for h in hs:
        weight[h.bounds_ms] = weight.get(h.bounds_ms, 0.0) + h.total
    bounds = max(weight, key=lambda b: weight[b])
    acc = [0.0] * (len(bounds) + 1)
    for h in hs:
        counts = h.counts if h.bounds_ms == bounds else rebucket(h, bounds)
        for i, c in enumerate(counts):
            acc[i] += c
    return Histogram(bounds, tuple(acc), sum(h.sum_ms for h in hs))


def percentile(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """q-quantile (0..1) of a bucketed histogram, interpolated inside the bucket."""
    total = sum(counts)
    if total <= 0 or not bounds or len(counts) != len(bounds) + 1:
        return None
    rank = q * total
    cum = 0.0
    for i, c in enumerate(counts):
        if c and cum + c >= rank:
            if i >= len(bounds):            # +Inf bucket: report the last finite bound
                return float(bounds[-1])
            lo = 0.0 if i == 0 else float(bounds[i - 1])
            hi = float(bounds[i])
            return lo + (hi - lo) * max(0.0, min(1.0, (rank - cum) / c))
        cum += c
    return float(bounds[-1])


def quantiles(h: Histogram) -> tuple[float | None, float | None, float | None]:
    """(p50, p95, p99) of ``h`` in ms; None without samples."""
    return (percentile(h.bounds_ms, h.counts, 0.50), percentile(h.bounds_ms, h.counts, 0.95),
            percentile(h.bounds_ms, h.counts, 0.99))


@dataclass(frozen=True)
class WindowStats:
    """Merged windows: totals, error rate (0..1) and latency quantiles of the merged
    histogram; ``covered_s`` is the length of the union of the windows' time spans."""

    requests: int
    errors: int
    error_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    devices: tuple[str, ...]       # devices with at least one window in the range
    first_ms: int | None           # earliest window start
    last_ms: int | None            # latest window end
    covered_s: float
    windows: int = 0
    requests_per_s: float | None = None   # requests / covered_s
    mean_ms: float | None = None
    resets: int = 0                # windows that followed a counter reset

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = list(self.devices)
        return d


def _covered_ms(spans: list[tuple[int, int]]) -> int:
    total, cur_lo, cur_hi = 0, None, None
    for lo, hi in sorted(spans):
        if cur_hi is None or cur_lo is None or lo > cur_hi:
            if cur_hi is not None and cur_lo is not None:
                total += cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    if cur_hi is not None and cur_lo is not None:
        total += cur_hi - cur_lo
    return total


def histogram_of(w: MetricWindow | PlainWindow) -> Histogram:
    if not w.counts or len(w.counts) != len(w.bounds_ms) + 1:
        return Histogram()
    return Histogram(tuple(w.bounds_ms), tuple(w.counts), w.sum_ms)


def stats_of(windows: Iterable[MetricWindow]) -> WindowStats:
    """Merge windows (any devices) into one WindowStats."""
    ws = list(windows)
    requests = sum(w.requests for w in ws)
    errors = sum(w.errors for w in ws)
    h = merge(histogram_of(w) for w in ws)
    p50, p95, p99 = quantiles(h)
    covered = _covered_ms([(w.start_ms, w.end_ms) for w in ws]) / 1000.0
    return WindowStats(
        requests=requests, errors=errors,
        error_rate=errors / requests if requests > 0 else None,
        p50_ms=p50, p95_ms=p95, p99_ms=p99,
        devices=tuple(sorted({w.device_id for w in ws})),
        first_ms=min((w.start_ms for w in ws), default=None),
        last_ms=max((w.end_ms for w in ws), default=None),
        covered_s=covered, windows=len(ws),
        requests_per_s=requests / covered if covered > 0 else None,
        mean_ms=h.sum_ms / h.total if h.total > 0 else None,
        resets=sum(1 for w in ws if w.reset))


# -- recording (called by controller/fleet/ingest.py) ----------------------------------------
def _counters(snap: MetricSnapshot) -> Counters:
    h, _ = checked_histogram(snap.bounds_ms, snap.counts, snap.sum_ms)
    return Counters(snap.requests, snap.errors, h)


def record(s: Session, *, device_id: str, at_ms: int, models: Mapping[tuple[str, int], Counters],
           buffered: bool = False, max_window_ms: int = MAX_WINDOW_MS
           ) -> dict[tuple[str, int], MetricWindow | None]:
    """Difference one Metrics message against the stored snapshots, add its MetricWindow rows
    to ``s`` and update the snapshots. Returns each (model, version)'s window, or None.
    (The batched ingest uses :class:`PlainBatch`: the same differencing for many messages,
    without ORM objects.)"""
    rows = s.exec(select(MetricSnapshot).where(MetricSnapshot.device_id == device_id)
                  .with_for_update()).all()
    snapshots = {(r.model_name, r.model_version): r for r in rows}
    return _difference_into(snapshots, device_id=device_id, at_ms=at_ms, models=models,
                            buffered=buffered, max_window_ms=max_window_ms,
                            new_snap=MetricSnapshot, new_window=MetricWindow, add=s.add)


def _difference_into(snaps: dict[tuple[str, int], Any], *, device_id: str, at_ms: int,
                     models: Mapping[tuple[str, int], Counters], buffered: bool,
                     max_window_ms: int, new_snap: Callable[..., Any],
                     new_window: Callable[..., Any], add: Callable[[Any], Any]
                     ) -> dict[tuple[str, int], Any]:
    """The differencing of :func:`record`, over any snapshot/window classes with the
    columns' attribute names (ORM rows, or PlainBatch's slotted records)."""
    marker = snaps.get((MARKER, 0))
    if marker is not None and at_ms <= marker.at_ms:
        log.info("device %s: metrics at %d not newer than %d; no window", device_id, at_ms,
                 marker.at_ms)
        return {key: None for key in models}
    prev_at = marker.at_ms if marker is not None else None
    fresh = prev_at is not None and at_ms - prev_at <= max_window_ms
    out: dict[tuple[str, int], Any] = {}
    for (name, version), cur in models.items():
        if not name:
            continue
        key = (name, min(int(version), MAX_COUNT))
        snap = snaps.get(key)
        delta: Delta | None = None
        start = prev_at
        if snap is not None and snap.at_ms == prev_at:
            if fresh:
                delta = difference(_counters(snap), cur)
        elif fresh:      # not in the device's previous message: everything is new since then
            delta = Delta(cur.requests, cur.errors, cur.latency)
        window = None
        if delta is not None and start is not None:
            hist = delta.latency
            has = hist.total > 0
            window = new_window(
                device_id=device_id, model_name=key[0], model_version=key[1], start_ms=start,
                end_ms=at_ms, requests=delta.requests, errors=delta.errors,
                bounds_ms=list(hist.bounds_ms) if has else [],
                counts=[int(c) for c in hist.counts] if has else [],
                sum_ms=hist.sum_ms if has else 0.0, buffered=buffered, reset=delta.reset)
            add(window)
            if delta.reset:
                log.info("device %s %s@%d: counters reset (agent restart?); window = new values",
                         device_id, key[0], key[1])
        out[key] = window
        if snap is None:
            snap = snaps[key] = new_snap(device_id=device_id, model_name=key[0],
                                         model_version=key[1], at_ms=at_ms)
        snap.at_ms, snap.requests, snap.errors = at_ms, cur.requests, cur.errors
        snap.bounds_ms, snap.counts = list(cur.latency.bounds_ms), [
            int(c) for c in cur.latency.counts]
        snap.sum_ms = cur.latency.sum_ms
        add(snap)
    if marker is None:
        marker = snaps[(MARKER, 0)] = new_snap(device_id=device_id, model_name=MARKER,
                                               model_version=0, at_ms=at_ms)
    marker.at_ms = at_ms
    add(marker)
    return out


_SNAP_COLS = ("device_id", "model_name", "model_version", "at_ms", "requests", "errors",
              "bounds_ms", "counts", "sum_ms")
_WINDOW_COLS = ("device_id", "model_name", "model_version", "start_ms", "end_ms", "requests",
                "errors", "bounds_ms", "counts", "sum_ms", "buffered", "reset")


class PlainSnap:
    """A MetricSnapshot row as a plain record (``stored``: it exists in the table)."""

    __slots__ = (*_SNAP_COLS, "stored", "dirty")

    def __init__(self, *, device_id: str, model_name: str, model_version: int, at_ms: int,
                 requests: int = 0, errors: int = 0, bounds_ms: list[float] | None = None,
                 counts: list[int] | None = None, sum_ms: float = 0.0,
                 stored: bool = False) -> None:
        self.device_id, self.model_name, self.model_version = device_id, model_name, model_version
        self.at_ms, self.requests, self.errors = at_ms, requests, errors
        self.bounds_ms, self.counts, self.sum_ms = bounds_ms or [], counts or [], sum_ms
        self.stored, self.dirty = stored, False


class PlainWindow:
    """A MetricWindow row as a plain record (the attributes histogram_of reads)."""

    __slots__ = _WINDOW_COLS
    device_id: str
    model_name: str
    model_version: int
    start_ms: int
    end_ms: int
    requests: int
    errors: int
    bounds_ms: list[float]
    counts: list[int]
    sum_ms: float
    buffered: bool
    reset: bool

    def __init__(self, **kw: Any) -> None:
        for k in _WINDOW_COLS:
            setattr(self, k, kw[k])


class PlainBatch:
    """Windows and snapshots of many Metrics messages, written with executemany statements
    (the batched ingest: controller/fleet/ingest_batch.py). ``load`` locks the devices'
    snapshot rows on PostgreSQL, in one order, like :func:`record` locks one device's."""

    def __init__(self, conn: Any, device_ids: Iterable[str]) -> None:
        self.conn = conn
        self.snaps: dict[str, dict[tuple[str, int], PlainSnap]] = {}
        self.windows: list[PlainWindow] = []
        t = MetricSnapshot.__table__  # type: ignore[attr-defined]
        ids = sorted(set(device_ids))
        for part in _chunks(ids):
            q = sa_select(*[t.c[c] for c in _SNAP_COLS]).where(t.c.device_id.in_(part))
            if conn.dialect.name == "postgresql":   # locked in one order: no deadlocks
                q = q.order_by(t.c.device_id, t.c.model_name, t.c.model_version
                               ).with_for_update()
            for r in conn.execute(q).all():
                snap = PlainSnap(**{c: getattr(r, c) for c in _SNAP_COLS}, stored=True)
                self.snaps.setdefault(r.device_id, {})[(r.model_name, r.model_version)] = snap
        for d in ids:
            self.snaps.setdefault(d, {})

    def _add(self, obj: Any) -> None:
        if isinstance(obj, PlainWindow):
            self.windows.append(obj)
        else:
            obj.dirty = True

    def record(self, *, device_id: str, at_ms: int, models: Mapping[tuple[str, int], Counters],
               buffered: bool = False, max_window_ms: int = MAX_WINDOW_MS
               ) -> dict[tuple[str, int], PlainWindow | None]:
        """:func:`record` for one message of the batch (in arrival order)."""
        return _difference_into(self.snaps.setdefault(device_id, {}), device_id=device_id,
                                at_ms=at_ms, models=models, buffered=buffered,
                                max_window_ms=max_window_ms, new_snap=PlainSnap,
                                new_window=PlainWindow, add=self._add)

    def write(self) -> None:
        """INSERT the windows and new snapshots, UPDATE the changed ones (executemany)."""
        t_w = MetricWindow.__table__  # type: ignore[attr-defined]
        t_s = MetricSnapshot.__table__  # type: ignore[attr-defined]
        if self.windows:
            self.conn.execute(t_w.insert(), [{c: getattr(w, c) for c in _WINDOW_COLS}
                                             for w in self.windows])
        new: list[PlainSnap] = []
        changed: list[PlainSnap] = []
        for per in self.snaps.values():
            for snap in per.values():
                if snap.dirty:
                    (changed if snap.stored else new).append(snap)
        if new:
            self.conn.execute(t_s.insert(), [{c: getattr(x, c) for c in _SNAP_COLS} for x in new])
        if changed:
            stmt = t_s.update().where(
                t_s.c.device_id == bindparam("k_dev"), t_s.c.model_name == bindparam("k_name"),
                t_s.c.model_version == bindparam("k_ver")).values(
                at_ms=bindparam("v_at"), requests=bindparam("v_req"),
                errors=bindparam("v_err"), bounds_ms=bindparam("v_bounds"),
                counts=bindparam("v_counts"), sum_ms=bindparam("v_sum"))
            self.conn.execute(stmt, [
                {"k_dev": x.device_id, "k_name": x.model_name, "k_ver": x.model_version,
                 "v_at": x.at_ms, "v_req": x.requests, "v_err": x.errors,
                 "v_bounds": x.bounds_ms, "v_counts": x.counts, "v_sum": x.sum_ms}
                for x in changed])
        for per in self.snaps.values():
            for snap in per.values():
                snap.stored, snap.dirty = True, False
        self.windows = []


def window_quantiles(w: MetricWindow | PlainWindow | None) -> tuple[float | None, float | None, float | None]:
    """(p50, p95, p99) of one window; Nones without a window or without samples."""
    return quantiles(histogram_of(w)) if w is not None else (None, None, None)


def prune(s: Session, *, cutoff_ms: int) -> None:
    """Delete windows that ended, and snapshots last seen, before ``cutoff_ms``."""
    s.exec(delete(MetricWindow).where(col(MetricWindow.end_ms) < cutoff_ms))  # type: ignore[call-overload]
    s.exec(delete(MetricSnapshot).where(col(MetricSnapshot.at_ms) < cutoff_ms))  # type: ignore[call-overload]


# -- queries (rollout gates, API, dashboard) ---------------------------------------------------
@contextmanager
def _reading(db: Session | Engine) -> Iterator[Session]:
    if isinstance(db, Session):
        yield db
    else:
        with Session(db, expire_on_commit=False) as s:
            yield s


def _chunks(ids: list[str], n: int = 500) -> Iterator[list[str]]:
    for i in range(0, len(ids), n):
        yield ids[i:i + n]


def window_stats(db: Session | Engine, *, model: str, version: int,
                 device_ids: Iterable[str] | None, since_ms: int,
                 until_ms: int | None = None) -> WindowStats:
    """Merged stats of ``model``@``version`` over the windows that END within
    [since_ms, until_ms] (until None = no upper bound), on ``device_ids`` (None = all)."""
    def query() -> Any:
        q = select(MetricWindow).where(MetricWindow.model_name == model,
                                       MetricWindow.model_version == int(version),
                                       col(MetricWindow.end_ms) >= since_ms)
        return q if until_ms is None else q.where(col(MetricWindow.end_ms) <= until_ms)

    found: list[MetricWindow] = []
    with _reading(db) as s:
        if device_ids is None:
            found = list(s.exec(query()).all())
        else:
            for part in _chunks(sorted(set(device_ids))):
                found.extend(s.exec(query().where(col(MetricWindow.device_id).in_(part))).all())
    return stats_of(found)


def recent_stats_all(db: Session | Engine, *, window_s: float, now_ms: int,
                     device_id: str | None = None, model: str | None = None
                     ) -> dict[tuple[str, str, int], WindowStats]:
    """Per (device, model, version): stats of the windows that ended in the last
    ``window_s`` seconds before ``now_ms``."""
    q = select(MetricWindow).where(col(MetricWindow.end_ms) >= now_ms - int(window_s * 1000),
                                   col(MetricWindow.end_ms) <= now_ms)
    if device_id is not None:
        q = q.where(MetricWindow.device_id == device_id)
    if model is not None:
        q = q.where(MetricWindow.model_name == model)
    groups: dict[tuple[str, str, int], list[MetricWindow]] = {}
    with _reading(db) as s:
        for w in s.exec(q).all():
            groups.setdefault((w.device_id, w.model_name, w.model_version), []).append(w)
    return {k: stats_of(v) for k, v in sorted(groups.items())}


def recent_stats(db: Session | Engine, *, device_id: str, model: str | None = None,
                 window_s: float = 60, now_ms: int) -> dict[tuple[str, int], WindowStats]:
    """Per (model, version) of one device: stats over the last ``window_s`` seconds."""
    return {(m, v): st for (_d, m, v), st in recent_stats_all(
        db, window_s=window_s, now_ms=now_ms, device_id=device_id, model=model).items()}


def list_windows(db: Session | Engine, *, device_id: str, model: str | None = None,
                 version: int | None = None, since_ms: int = 0, until_ms: int | None = None,
                 limit: int = 500) -> list[MetricWindow]:
    """The newest ``limit`` windows of one device ending in [since_ms, until_ms], oldest
    first."""
    q = select(MetricWindow).where(MetricWindow.device_id == device_id,
                                   col(MetricWindow.end_ms) >= since_ms)
    if until_ms is not None:
        q = q.where(col(MetricWindow.end_ms) <= until_ms)
    if model is not None:
        q = q.where(MetricWindow.model_name == model)
    if version is not None:
        q = q.where(MetricWindow.model_version == int(version))
    q = q.order_by(col(MetricWindow.end_ms).desc(), col(MetricWindow.id).desc()).limit(limit)
    with _reading(db) as s:
        return list(reversed(s.exec(q).all()))


def window_view(w: MetricWindow) -> dict[str, Any]:
    """JSON shape of one window (the API's /metrics/windows items)."""
    p50, p95, p99 = window_quantiles(w)
    span_s = max(0, w.end_ms - w.start_ms) / 1000.0
    return {
        "device_id": w.device_id, "model": w.model_name, "version": w.model_version,
        "start_ms": w.start_ms, "end_ms": w.end_ms, "duration_s": span_s,
        "requests": w.requests, "errors": w.errors,
        "requests_per_s": w.requests / span_s if span_s > 0 else None,
        "error_rate": w.errors / w.requests if w.requests > 0 else None,
        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
        "latency": {"bounds_ms": list(w.bounds_ms), "counts": list(w.counts),
                    "sum_ms": w.sum_ms},
        "buffered": w.buffered, "reset": w.reset,
    }
