"""Server-rendered HTML dashboard: fleet overview and one page per device.

Installed on the API app by controller/api/app.py (``install_dashboard``). Pages are plain
string templates (every value passes through ``html.escape``); the numbers come from
controller/api/queries.py, the same as the JSON API. A small vanilla script
(static/dashboard.js, served from this package, no CDN) polls the JSON API every 2 s to keep
the tables and the device's live metrics current. Every latency, throughput and error value
shown is windowed (controller/fleet/windows.py) and the page says over which window; devices
that are offline or silent show health "stale" and their metrics are marked stale.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response

from controller.api import queries
from controller.api.core_access import db_session

STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, body: str, *, script_data: str = "") -> str:
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)} - edgefleet</title>"
        "<link rel=\"stylesheet\" href=\"/static/dashboard.css\"></head><body>"
        "<header><a class=\"brand\" href=\"/\">edgefleet</a>"
        "<nav><a href=\"/\">Fleet</a> <a href=\"/api/v1/devices\">API</a></nav></header>"
        f"<main>{body}</main>{script_data}"
        "<script src=\"/static/dashboard.js\"></script></body></html>"
    )


def age_text(age_s: float | None) -> str:
    if age_s is None:
        return "never"
    if age_s < 120:
        return f"{age_s:.0f}s ago"
    if age_s < 7200:
        return f"{age_s / 60:.0f}m ago"
    return f"{age_s / 3600:.1f}h ago"


def _status_badge(online: bool) -> str:
    cls = "online" if online else "offline"
    return f"<span class=\"badge {cls}\">{cls}</span>"


def device_rows(devices: list[dict[str, Any]]) -> str:
    if not devices:
        return "<tr><td colspan=\"7\" class=\"empty\">no devices yet: start an agent</td></tr>"
    rows = []
    for d in devices:
        served = f"{d['model']}@{d['version']}" if d["model"] else "-"
        rows.append(
            f"<tr data-device=\"{esc(d['id'])}\">"
            f"<td><a href=\"/devices/{esc(d['id'])}\">{esc(d['id'])}</a></td>"
            f"<td>{esc(d['device_class'])}</td>"
            f"<td class=\"status\">{_status_badge(d['online'])}</td>"
            f"<td class=\"served\">{esc(served)}</td>"
            f"<td class=\"age\">{esc(age_text(d['last_heartbeat_age_s']))}</td>"
            f"<td class=\"health{' stale' if d.get('stale') else ''}\">"
            f"{esc(d['health'] or '-')}</td>"
            f"<td class=\"update\">{esc(d['update_state'] or '-')}</td></tr>")
    return "".join(rows)


def model_rows(models: list[dict[str, Any]]) -> str:
    if not models:
        return "<tr><td colspan=\"5\" class=\"empty\">no models: edgefleet apply -f ...</td></tr>"
    return "".join(
        f"<tr><td>{esc(m['namespace'])}/{esc(m['name'])}</td><td>{esc(m['version'])}</td>"
        f"<td>{esc(m['compiled'] or '-')}</td><td>{esc(m['phase'] or '-')}</td>"
        f"<td>{esc(m['message'])}</td></tr>" for m in models)


def rollout_rows(rollouts: list[dict[str, Any]]) -> str:
    if not rollouts:
        return "<tr><td colspan=\"6\" class=\"empty\">no rollouts</td></tr>"
    out = []
    for r in rollouts:
        total = r["devices_total"] or 0
        pct = int(100 * r["devices_committed"] / total) if total else 0
        out.append(
            f"<tr><td>{esc(r['namespace'])}/{esc(r['name'])}</td><td>{esc(r['model'])}</td>"
            f"<td>{esc(r['phase'] or '-')}</td>"
            f"<td><progress max=\"100\" value=\"{pct}\"></progress> {esc(r['progress'])}</td>"
            f"<td>{esc(r['bytes_sent_total'])}</td><td>{esc(r['message'])}</td></tr>")
    return "".join(out)


def event_rows(events: list[dict[str, Any]]) -> str:
    if not events:
        return "<tr><td colspan=\"4\" class=\"empty\">no events</td></tr>"
    return "".join(
        f"<tr class=\"{esc(e['type']).lower()}\"><td class=\"ts\" data-ms=\"{esc(e['at_ms'])}\">"
        f"{esc(e['at_ms'])}</td><td>{esc(e['kind'])}/{esc(e['name'])}</td>"
        f"<td>{esc(e['reason'])}</td><td>{esc(e['message'])}</td></tr>" for e in events)


def overview_html(devices: list[dict[str, Any]], models: list[dict[str, Any]],
                  rollouts: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    online = sum(1 for d in devices if d["online"])
    body = (
        f"<h1>Fleet</h1><p class=\"summary\" id=\"summary\">{online}/{len(devices)} devices "
        "online</p>"
        "<h2>Devices</h2><table id=\"devices\"><thead><tr><th>Device</th><th>Class</th>"
        "<th>Status</th><th>Model@version</th><th>Last heartbeat</th><th>Health</th>"
        f"<th>Update</th></tr></thead><tbody>{device_rows(devices)}</tbody></table>"
        "<h2>Models</h2><table id=\"models\"><thead><tr><th>Model</th><th>Version</th>"
        "<th>Compiled</th><th>Phase</th><th>Message</th></tr></thead>"
        f"<tbody>{model_rows(models)}</tbody></table>"
        "<h2>Rollouts</h2><table id=\"rollouts\"><thead><tr><th>Rollout</th><th>Model</th>"
        "<th>Phase</th><th>Progress</th><th>Bytes sent</th><th>Message</th></tr></thead>"
        f"<tbody>{rollout_rows(rollouts)}</tbody></table>"
        "<h2>Events</h2><table id=\"events\"><thead><tr><th>Time</th><th>Object</th>"
        f"<th>Reason</th><th>Message</th></tr></thead><tbody>{event_rows(events)}</tbody>"
        "</table>")
    return page("Fleet", body, script_data="<script>window.EDGEFLEET={page:'overview'}</script>")


def metrics_window_note(window: str) -> str:
    """The sentence that states the window of the live metrics table."""
    return (f"<p class=\"window-note\" id=\"metrics-window\">Requests/s, error rate and "
            f"p50/p95/p99 over the last {window} s, per model@version; totals since the agent "
            "started. <span class=\"badge stale\">stale</span> marks a device that is offline "
            "or silent.</p>")


def device_html(d: dict[str, Any]) -> str:
    served = "".join(
        f"<tr><td>{esc(m.get('name'))}</td><td>{esc(m.get('version'))}</td>"
        f"<td>{esc(m.get('variant') or '-')}</td><td>{esc(m.get('slot'))}</td>"
        f"<td>{esc(m.get('engine_kind') or m.get('engineKind'))}</td>"
        f"<td>{esc(m.get('precision'))}</td><td>{'yes' if m.get('active', False) else 'no'}</td>"
        "</tr>" for m in d["models"]) or "<tr><td colspan=\"7\" class=\"empty\">none</td></tr>"
    rollouts = "".join(
        f"<tr><td>{esc(r['rollout'])}</td><td>{esc(r['model'])}@{esc(r['version'])}</td>"
        f"<td>{esc(r['state'])}</td><td>{esc(r['codec'])}</td><td>{esc(r['bytes_sent'])}</td>"
        f"<td>{esc(r['reason'])}</td></tr>" for r in d["rollouts"]
    ) or "<tr><td colspan=\"6\" class=\"empty\">none</td></tr>"
    desired = "".join(
        f"<tr><td>{esc(t['model'])}{(' (' + esc(t['variant']) + ')') if t['variant'] else ''}"
        f"</td><td>{esc(t['desired'])}</td><td>{esc(t['serving'] or '-')}</td>"
        f"<td class=\"update\">{esc(t['state'])}</td><td>{esc(t['rollout'] or '-')}</td>"
        f"<td>{esc(t['reason'])}</td></tr>" for t in d.get("desired") or []
    ) or "<tr><td colspan=\"6\" class=\"empty\">no targets</td></tr>"
    faults = "".join(
        f"<li>{esc(f.get('name'))} v{esc(f.get('version'))}: {esc(f.get('reason'))} "
        f"{esc(f.get('message'))}</li>" for f in d.get("faults") or [])
    facts = d.get("facts") or {}
    window = esc(d.get("metrics_window_s") or queries.DEFAULT_WINDOW_S)
    stale_cls = "stale" if d.get("stale") else ""
    body = (
        f"<h1>Device {esc(d['id'])}</h1>"
        "<dl class=\"facts\">"
        f"<dt>Class</dt><dd>{esc(d['device_class'])}</dd>"
        f"<dt>Status</dt><dd id=\"dev-status\">{_status_badge(d['online'])} "
        f"{esc(d['offline_reason'])}</dd>"
        f"<dt>Last heartbeat</dt><dd id=\"dev-age\">{esc(age_text(d['last_heartbeat_age_s']))}"
        "</dd>"
        f"<dt>Health</dt><dd id=\"dev-health\" class=\"{stale_cls}\">"
        f"{esc(d['health'] or '-')} "
        f"{esc(d['health_reason'])}</dd>"
        f"<dt>Agent</dt><dd>{esc(d['agent_version'])} up {esc(d['uptime_s'])}s</dd>"
        f"<dt>Arch</dt><dd>{esc(facts.get('arch', ''))}</dd>"
        f"<dt>Serve URL</dt><dd>{esc(d['serve_url'])}</dd></dl>"
        f"<h2>Live metrics</h2>{metrics_window_note(window)}"
        "<table id=\"metrics\"><thead><tr><th>Model@version</th>"
        f"<th>Requests/s ({window} s)</th><th>Error rate ({window} s)</th>"
        f"<th>p50 ms ({window} s)</th><th>p95 ms ({window} s)</th><th>p99 ms ({window} s)</th>"
        "<th>Requests total</th><th>Errors total</th><th>CPU %</th><th>RSS MiB</th>"
        "<th>Temp &deg;C</th></tr></thead><tbody><tr><td colspan=\"11\" "
        "class=\"empty\">waiting for metrics</td></tr></tbody></table>"
        "<canvas id=\"chart\" width=\"640\" height=\"140\" "
        "aria-label=\"p95 latency per metrics window\"></canvas>"
        "<h2>Served models</h2><table id=\"served\"><thead><tr><th>Name</th><th>Version</th>"
        "<th>Variant</th><th>Slot</th><th>Engine</th><th>Precision</th><th>Active</th></tr>"
        f"</thead><tbody>{served}</tbody></table>"
        "<h2>Desired vs observed</h2><table id=\"desired\"><thead><tr><th>Model</th>"
        "<th>Desired</th><th>Serving</th><th>State</th><th>Rollout</th><th>Why</th></tr>"
        f"</thead><tbody>{desired}</tbody></table>"
        + (f"<h2>Faults</h2><ul id=\"faults\">{faults}</ul>" if faults else "")
        + "<h2>Update history</h2><table id=\"device-rollouts\"><thead><tr><th>Rollout</th>"
        "<th>Target</th><th>State</th><th>Codec</th><th>Bytes sent</th><th>Reason</th></tr>"
        f"</thead><tbody>{rollouts}</tbody></table>")
    data = html.escape(d["id"], quote=True)
    return page(f"Device {d['id']}", body,
                script_data=f"<script>window.EDGEFLEET={{page:'device',device:\"{data}\"}}"
                            "</script>")


def install_dashboard(app: FastAPI, core: Any) -> None:
    """Add the dashboard's HTML routes and its static files to ``app``."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview() -> HTMLResponse:
        with db_session(core) as s:
            res = queries.resources_of(core)
            devices = queries.list_devices(s, stale_after_s=queries.stale_after_of(core))
            body = overview_html(devices, queries.list_models(s, resources=res),
                                 queries.list_rollouts(s, resources=res),
                                 queries.list_events(s, limit=20))
        return HTMLResponse(body)

    @app.get("/devices/{device_id}", response_class=HTMLResponse, include_in_schema=False)
    def device_page(device_id: str) -> HTMLResponse:
        with db_session(core) as s:
            d = queries.get_device(s, device_id, stale_after_s=queries.stale_after_of(core))
        if d is None:
            raise HTTPException(404, f"device {device_id!r} not found")
        return HTMLResponse(device_html(d))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_TYPES:
            raise HTTPException(404, "not found")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_TYPES[name],
                        headers={"Cache-Control": "no-cache"})
