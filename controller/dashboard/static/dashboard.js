// edgefleet dashboard: polls the JSON API every 2 s and refreshes the tables. No dependencies.
// The overview reads one page of devices (?limit=) and /api/v1/fleet/summary for the counts.
(function () {
  "use strict";
  var cfg = window.EDGEFLEET || {};
  var POLL_MS = 2000;

  function esc(v) {
    return String(v === null || v === undefined ? "" : v).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function age(s) {
    if (s === null || s === undefined) return "never";
    if (s < 120) return Math.round(s) + "s ago";
    if (s < 7200) return Math.round(s / 60) + "m ago";
    return (s / 3600).toFixed(1) + "h ago";
  }
  function badge(online) {
    var c = online ? "online" : "offline";
    return '<span class="badge ' + c + '">' + c + "</span>";
  }
  function pct(v) {
    return typeof v === "number" ? (100 * v).toFixed(2) + " %" : "-";
  }
  function healthCell(d) {
    return '<td class="health' + (d.stale ? " stale" : "") + '">' + esc(d.health || "-") + "</td>";
  }
  function num(v, digits) {
    if (v === null || v === undefined) return "-";
    return typeof v === "number" && digits !== undefined ? v.toFixed(digits) : String(v);
  }
  function getJSON(url) {
    return fetch(url, { cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      return r.json();
    });
  }
  function setBody(id, html) {
    var t = document.querySelector("#" + id + " tbody");
    if (t) t.innerHTML = html;
  }
  function fmtTimes() {
    document.querySelectorAll("td.ts").forEach(function (td) {
      var ms = Number(td.getAttribute("data-ms"));
      if (ms) td.textContent = new Date(ms).toLocaleTimeString();
    });
  }

  // the table shows the first DEVICE_PAGE devices (one page of the API, not the whole fleet
  // every 2 s); the counts come from the fleet summary
  var DEVICE_PAGE = 500;

  function refreshOverview() {
    Promise.all([
      getJSON("/api/v1/devices?limit=" + DEVICE_PAGE),
      getJSON("/api/v1/fleet/summary")
    ]).then(function (res) {
      var items = res[0].items || [], sum = res[1];
      var s = document.getElementById("summary");
      if (s) {
        s.textContent = sum.online + "/" + sum.total + " devices online" +
          (sum.total > items.length ? " (table: first " + items.length + ")" : "");
      }
      if (!items.length) return;
      setBody("devices", items.map(function (d) {
        var served = d.model ? d.model + "@" + d.version : "-";
        return '<tr data-device="' + esc(d.id) + '"><td><a href="/devices/' + esc(d.id) + '">' +
          esc(d.id) + "</a></td><td>" + esc(d.device_class) + '</td><td class="status">' +
          badge(d.online) + '</td><td class="served">' + esc(served) + '</td><td class="age">' +
          esc(age(d.last_heartbeat_age_s)) + "</td>" + healthCell(d) +
          '<td class="update">' + esc(d.update_state || "-") + "</td></tr>";
      }).join(""));
    }).catch(function () {});
    getJSON("/api/v1/rollouts").then(function (data) {
      var items = data.items || [];
      if (!items.length) return;
      setBody("rollouts", items.map(function (r) {
        var pct = r.devices_total ? Math.floor(100 * r.devices_committed / r.devices_total) : 0;
        return "<tr><td>" + esc(r.namespace) + "/" + esc(r.name) + "</td><td>" + esc(r.model) +
          "</td><td>" + esc(r.phase || "-") + '</td><td><progress max="100" value="' + pct +
          '"></progress> ' + esc(r.progress) + "</td><td>" + esc(r.bytes_sent_total) +
          "</td><td>" + esc(r.message) + "</td></tr>";
      }).join(""));
    }).catch(function () {});
    getJSON("/api/v1/models").then(function (data) {
      var items = data.items || [];
      if (!items.length) return;
      setBody("models", items.map(function (m) {
        return "<tr><td>" + esc(m.namespace) + "/" + esc(m.name) + "</td><td>" + esc(m.version) +
          "</td><td>" + esc(m.compiled || "-") + "</td><td>" + esc(m.phase || "-") + "</td><td>" +
          esc(m.message) + "</td></tr>";
      }).join(""));
    }).catch(function () {});
  }

  // one point per Metrics message: the p95 of its own window (since the device's previous
  // message), or, without latencies (no requests), the requests/s of that window
  function drawChart(samples) {
    var c = document.getElementById("chart");
    if (!c || !c.getContext) return;
    var g = c.getContext("2d");
    g.clearRect(0, 0, c.width, c.height);
    var field = "p95_ms", unit = " ms", label = "p95 latency per metrics window (ms)";
    var pts = samples.map(function (m) { return m[field]; }).filter(function (v) {
      return typeof v === "number";
    });
    if (pts.length < 2) {
      field = "requests_per_s"; unit = "/s"; label = "requests/s per metrics window";
      pts = samples.map(function (m) { return m[field]; }).filter(function (v) {
        return typeof v === "number";
      });
    }
    g.fillStyle = "#374151";
    g.font = "12px sans-serif";
    g.fillText(label + ", last " + pts.length + " windows", 8, 14);
    if (pts.length < 2) return;
    var max = Math.max.apply(null, pts) || 1;
    g.strokeStyle = "#2563eb";
    g.lineWidth = 2;
    g.beginPath();
    pts.forEach(function (v, i) {
      var x = 8 + (i * (c.width - 16)) / (pts.length - 1);
      var y = c.height - 8 - (v / max) * (c.height - 30);
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
    g.fillText(max.toFixed(2) + unit, c.width - 70, 14);
  }

  function refreshDevice() {
    var id = encodeURIComponent(cfg.device);
    getJSON("/api/v1/devices/" + id).then(function (d) {
      var st = document.getElementById("dev-status");
      if (st) st.innerHTML = badge(d.online) + " " + esc(d.offline_reason);
      var a = document.getElementById("dev-age");
      if (a) a.textContent = age(d.last_heartbeat_age_s);
      var h = document.getElementById("dev-health");
      if (h) {
        h.textContent = (d.health || "-") + " " + (d.health_reason || "");
        h.className = d.stale ? "stale" : "";
      }
      var w = document.getElementById("metrics-window");
      if (w && d.metrics_window_s) {
        w.firstChild.textContent = "Requests/s, error rate and p50/p95/p99 over the last " +
          d.metrics_window_s + " s, per model@version; totals since the agent started. ";
      }
      var ms = d.metrics || [];
      if (ms.length) {
        setBody("metrics", ms.map(function (m) {
          var rss = m.agent_rss_bytes ? (m.agent_rss_bytes / 1048576).toFixed(1) : "-";
          var mark = m.stale ? ' <span class="badge stale">stale</span>' : "";
          return "<tr" + (m.stale ? ' class="stale"' : "") + "><td>" + esc(m.model || "(host)") +
            "@" + esc(m.version) + mark + "</td><td>" + num(m.requests_per_s, 2) + "</td><td>" +
            pct(m.error_rate) + "</td><td>" + num(m.p50_ms, 2) + "</td><td>" +
            num(m.p95_ms, 2) + "</td><td>" + num(m.p99_ms, 2) + "</td><td>" +
            esc(m.requests_total) + "</td><td>" + esc(m.errors_total) + "</td><td>" +
            num(m.cpu_percent, 1) + "</td><td>" + rss + "</td><td>" + num(m.temperature_c, 1) +
            "</td></tr>";
        }).join(""));
      }
    }).catch(function () {});
    getJSON("/api/v1/devices/" + id + "/metrics?limit=60").then(function (data) {
      drawChart(data.items || []);
    }).catch(function () {});
  }

  function tick() {
    if (cfg.page === "overview") refreshOverview();
    else if (cfg.page === "device") refreshDevice();
    fmtTimes();
  }
  fmtTimes();
  if (cfg.page === "device") refreshDevice();
  setInterval(tick, POLL_MS);
})();
