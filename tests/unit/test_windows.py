"""Windowed metrics (controller/fleet/windows.py): differencing, resets, merging, quantiles,
first-message behaviour, and the window_stats / recent_stats queries on a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from controller.fleet import windows as w
from controller.fleet.db import make_engine, session_scope
from controller.fleet.ingest import percentile as ingest_percentile
from controller.fleet.windows import (
    Counters,
    Histogram,
    MetricSnapshot,
    MetricWindow,
    difference,
    merge,
    percentile,
    rebucket,
    stats_of,
)

B = (1.0, 2.0, 5.0, 10.0)
T0 = 1_700_000_000_000            # epoch ms above 2**31: the columns must be 64-bit


def c(requests: int, counts: tuple[int, ...], *, errors: int = 0, sum_ms: float = 0.0,
      bounds: tuple[float, ...] = B) -> Counters:
    return Counters(requests, errors, Histogram(bounds, counts, sum_ms))


# -- pure functions ---------------------------------------------------------------------------
def test_percentile_is_still_importable_from_ingest() -> None:
    assert ingest_percentile is percentile
    assert percentile([1, 2], [0, 0, 0], 0.5) is None
    assert percentile([10], [4, 0], 0.5) == 5.0
    assert percentile([10], [0, 3], 0.99) == 10.0      # +Inf bucket: the last finite bound
    assert percentile([1, 2], [1, 2], 0.5) is None     # malformed
    assert percentile([10.0], [2.5, 2.5], 0.5) == 10.0  # fractional (merged) counts


def test_difference_of_growing_counters() -> None:
    d = difference(c(100, (0, 50, 40, 10, 0), errors=2, sum_ms=300.0),
                   c(150, (0, 50, 40, 10, 50), errors=7, sum_ms=800.0))
    assert (d.requests, d.errors, d.reset) == (50, 5, False)
    assert d.latency.counts == (0, 0, 0, 0, 50) and d.latency.sum_ms == 500.0
    idle = difference(c(5, (5, 0, 0, 0, 0)), c(5, (5, 0, 0, 0, 0)))
    assert (idle.requests, idle.latency.total, idle.reset) == (0, 0, False)


@pytest.mark.parametrize("prev,cur", [
    (c(100, (0, 50, 40, 10, 0)), c(20, (0, 10, 10, 0, 0))),              # requests down
    (c(100, (0, 50, 40, 10, 0), errors=9), c(120, (0, 70, 40, 10, 0))),   # errors down
    (c(100, (0, 50, 40, 10, 0)), c(130, (30, 40, 50, 10, 0))),            # one bucket down
    (c(100, (0, 50, 40, 10, 0)), c(130, (0, 70, 50, 10), bounds=(1.0, 2.0, 5.0))),  # bounds
])
def test_a_reset_makes_the_new_cumulative_values_the_delta(prev: Counters,
                                                          cur: Counters) -> None:
    d = difference(prev, cur)
    assert d.reset
    assert (d.requests, d.errors, d.latency) == (cur.requests, cur.errors, cur.latency)
    assert d.requests >= 0 and all(x >= 0 for x in d.latency.counts)


def test_checked_histogram_refuses_malformed_ones() -> None:
    ok, why = w.checked_histogram([1, 2], [1, 2, 3], 10.0)
    assert ok == Histogram((1.0, 2.0), (1, 2, 3), 10.0) and why == ""
    for bounds, counts in (([1, 2], [1, 2]), ([2, 1], [0, 0, 0]), ([1, float("nan")], [0] * 3),
                           ([float(i) for i in range(1, 300)], [0] * 300)):
        h, why = w.checked_histogram(bounds, counts, 0.0)
        assert h == Histogram() and why
    assert w.checked_histogram([], [], 0.0) == (Histogram(), "")


def test_merge_same_bounds_adds_counts() -> None:
    m = merge([Histogram(B, (1, 2, 3, 4, 5), 10.0), Histogram(B, (0, 0, 0, 0, 5), 20.0),
               Histogram()])
    assert m.bounds_ms == B and m.counts == (1, 2, 3, 4, 10) and m.sum_ms == 30.0
    assert merge([]) == Histogram() and merge([Histogram(B, (0,) * 5)]) == Histogram()


def test_merge_other_bounds_rebuckets_proportionally() -> None:
    coarse = Histogram((10.0,), (4, 0))                   # 4 samples in (0, 10]
    fine = Histogram((5.0, 10.0, 20.0), (10, 10, 0, 0))   # most samples: its bounds win
    assert rebucket(coarse, (5.0, 10.0, 20.0)) == (2.0, 2.0, 0.0, 0.0)
    assert rebucket(Histogram((10.0,), (0, 3)), (5.0, 10.0, 20.0)) == (0.0, 0.0, 3.0, 0.0)
    m = merge([coarse, fine])
    assert m.bounds_ms == (5.0, 10.0, 20.0) and m.counts == (12.0, 12.0, 0.0, 0.0)
    assert m.total == 24


def test_window_quantiles_reflect_only_the_window() -> None:
    """A steady 1..2 ms hour, then a slow minute: the window's p99 sees the slow minute; the
    lifetime histogram's does not."""
    steady = c(10_000, (0, 10_000, 0, 0, 0))
    later = c(10_050, (0, 10_000, 0, 0, 50))               # 50 requests over 10 ms
    d = difference(steady, later)
    lifetime_p99 = percentile(later.latency.bounds_ms, later.latency.counts, 0.99)
    _, _, window_p99 = w.quantiles(d.latency)
    assert lifetime_p99 is not None and lifetime_p99 <= 2.0
    assert window_p99 == 10.0


def test_stats_of_merges_windows_across_devices() -> None:
    ws = [MetricWindow(device_id="a", model_name="m", model_version=1, start_ms=0,
                       end_ms=10_000, requests=100, errors=1, bounds_ms=list(B),
                       counts=[0, 100, 0, 0, 0], sum_ms=150.0),
          MetricWindow(device_id="a", model_name="m", model_version=1, start_ms=10_000,
                       end_ms=20_000, requests=0, errors=0),
          MetricWindow(device_id="b", model_name="m", model_version=1, start_ms=5_000,
                       end_ms=25_000, requests=100, errors=3, bounds_ms=list(B),
                       counts=[0, 0, 0, 100, 0], sum_ms=800.0, reset=True)]
    st = stats_of(ws)
    assert (st.requests, st.errors, st.windows, st.resets) == (200, 4, 3, 1)
    assert st.error_rate == pytest.approx(0.02)
    assert st.devices == ("a", "b") and (st.first_ms, st.last_ms) == (0, 25_000)
    assert st.covered_s == 25.0 and st.requests_per_s == pytest.approx(8.0)
    assert st.p50_ms == 2.0 and st.p99_ms == pytest.approx(9.9)
    assert st.mean_ms == pytest.approx(4.75)
    empty = stats_of([])
    assert (empty.requests, empty.error_rate, empty.p99_ms, empty.devices, empty.covered_s) \
        == (0, None, None, (), 0.0)
    assert st.as_dict()["devices"] == ["a", "b"]


# -- recording and queries on a real database --------------------------------------------------
@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield e
    e.dispose()


def rec(engine: Engine, at: int, models: dict[tuple[str, int], Counters], *, dev: str = "d1",
        buffered: bool = False) -> dict[tuple[str, int], MetricWindow | None]:
    with session_scope(engine) as s:
        return w.record(s, device_id=dev, at_ms=at, models=models, buffered=buffered)


def test_first_message_records_only_the_snapshot(engine: Engine) -> None:
    out = rec(engine, T0, {("m", 1): c(10_000, (0, 10_000, 0, 0, 0))})
    assert out == {("m", 1): None}
    with Session(engine) as s:
        assert s.exec(select(MetricWindow)).all() == []
        snaps = {(x.model_name, x.model_version): x for x in s.exec(select(MetricSnapshot))}
    assert snaps[("m", 1)].requests == 10_000 and snaps[("m", 1)].at_ms == T0
    assert snaps[(w.MARKER, 0)].at_ms == T0
    # the second message differences against the persisted snapshot (a fresh engine: as a
    # restarted controller or another replica would)
    out = rec(engine, T0 + 15_000, {("m", 1): c(10_300, (0, 10_100, 200, 0, 0), errors=3)})
    win = out[("m", 1)]
    assert win is not None and (win.start_ms, win.end_ms) == (T0, T0 + 15_000)
    assert (win.requests, win.errors, win.counts, win.reset) == (300, 3, [0, 100, 200, 0, 0],
                                                                  False)
    assert w.window_quantiles(win)[0] == pytest.approx(2.0 + 3.0 * 0.25)


def test_restart_gives_the_new_counts_not_a_negative_window(engine: Engine) -> None:
    rec(engine, T0, {("m", 1): c(10_000, (0, 10_000, 0, 0, 0))})
    rec(engine, T0 + 10_000, {("m", 1): c(10_100, (0, 10_100, 0, 0, 0))})
    out = rec(engine, T0 + 20_000, {("m", 1): c(40, (0, 0, 40, 0, 0), errors=1)})
    win = out[("m", 1)]
    assert win is not None and win.reset and (win.requests, win.errors) == (40, 1)
    assert win.counts == [0, 0, 40, 0, 0]
    nxt = rec(engine, T0 + 30_000, {("m", 1): c(50, (0, 0, 50, 0, 0), errors=1)})[("m", 1)]
    assert nxt is not None and not nxt.reset and nxt.requests == 10


def test_new_version_counts_since_the_previous_message(engine: Engine) -> None:
    rec(engine, T0, {("m", 1): c(100, (0, 100, 0, 0, 0))})
    out = rec(engine, T0 + 10_000, {("m", 1): c(150, (0, 150, 0, 0, 0)),
                                    ("m", 2): c(30, (0, 0, 0, 30, 0))})
    v2 = out[("m", 2)]
    assert v2 is not None and (v2.start_ms, v2.requests) == (T0, 30) and not v2.reset
    assert out[("m", 1)] is not None


def test_long_silence_and_out_of_order_messages_make_no_window(engine: Engine) -> None:
    rec(engine, T0, {("m", 1): c(100, (0, 100, 0, 0, 0))})
    late = T0 + w.MAX_WINDOW_MS + 1
    assert rec(engine, late, {("m", 1): c(9_000, (0, 9_000, 0, 0, 0))}) == {("m", 1): None}
    # older than the last message: ignored, the snapshot stays
    assert rec(engine, late - 5, {("m", 1): c(8_000, (0, 8_000, 0, 0, 0))}) == {("m", 1): None}
    win = rec(engine, late + 1000, {("m", 1): c(9_010, (0, 9_010, 0, 0, 0))})[("m", 1)]
    assert win is not None and win.requests == 10


def test_window_stats_and_recent_stats(engine: Engine) -> None:
    fast, slow = (0, 1, 0, 0, 0), (0, 0, 0, 0, 1)
    for dev in ("a", "b", "c"):
        rec(engine, T0, {("m", 1): c(0, (0,) * 5)}, dev=dev)
    for i in range(1, 7):
        for dev in ("a", "b", "c"):
            n = 100 * i
            counts = tuple(n * x for x in (slow if dev == "c" else fast))
            rec(engine, T0 + i * 10_000, {("m", 1): c(n, counts, errors=i if dev == "b" else 0),
                                          ("m", 0): c(0, (0,) * 5)}, dev=dev)
    st = w.window_stats(engine, model="m", version=1, device_ids=["a", "b"], since_ms=T0,
                        until_ms=T0 + 60_000)
    assert (st.requests, st.errors, st.devices, st.windows) == (1200, 6, ("a", "b"), 12)
    assert st.p99_ms is not None and st.p99_ms <= 2.0 and st.covered_s == 60.0
    assert st.error_rate == pytest.approx(6 / 1200)
    # windows that END within [since, until]: the last two of each device
    late = w.window_stats(engine, model="m", version=1, device_ids=None,
                          since_ms=T0 + 50_000)
    assert late.devices == ("a", "b", "c") and late.windows == 6 and late.p99_ms == 10.0
    assert w.window_stats(engine, model="m", version=1, device_ids=[], since_ms=0).windows == 0
    assert w.window_stats(engine, model="m", version=9, device_ids=None,
                          since_ms=0).requests == 0
    with Session(engine) as s:       # a Session works as well as an Engine
        rs = w.recent_stats(s, device_id="c", window_s=20, now_ms=T0 + 60_000)
    assert set(rs) == {("m", 0), ("m", 1)}
    assert rs[("m", 1)].requests == 300 and rs[("m", 1)].p50_ms == 10.0
    assert rs[("m", 0)].requests == 0 and rs[("m", 0)].p50_ms is None
    only = w.recent_stats(engine, device_id="c", model="m", window_s=20, now_ms=T0 + 60_000)
    assert set(only) == {("m", 0), ("m", 1)}
    listed = w.list_windows(engine, device_id="a", model="m", version=1, limit=3)
    assert [x.end_ms for x in listed] == [T0 + 40_000, T0 + 50_000, T0 + 60_000]
    view = w.window_view(listed[-1])
    assert view["requests"] == 100 and view["requests_per_s"] == 10.0 and view["p99_ms"]


def test_prune_deletes_old_windows_and_snapshots(engine: Engine) -> None:
    rec(engine, T0, {("m", 1): c(0, (0,) * 5)})
    rec(engine, T0 + 10_000, {("m", 1): c(5, (5, 0, 0, 0, 0))})
    rec(engine, T0 + 20_000, {("m", 1): c(9, (9, 0, 0, 0, 0))}, dev="d2")
    with session_scope(engine) as s:
        w.prune(s, cutoff_ms=T0 + 15_000)
    with Session(engine) as s:
        assert s.exec(select(MetricWindow)).all() == []
        assert {x.device_id for x in s.exec(select(MetricSnapshot))} == {"d2"}
