/* asyncinfer dashboard: polls GET /v1/dashboard/summary with the admin key
 * kept in sessionStorage and redraws in place (no reloads). Every value from
 * the server is put in the page as text (textContent), never as HTML. */
(function () {
  "use strict";

  var KEY_STORAGE = "asyncinfer.dashboard.apiKey";
  var REFRESH_MS = 3000;
  var SUMMARY_URL = "/v1/dashboard/summary";

  var state = {
    key: null,
    timer: null,
    inflight: false,
    summary: null,
    cards: {},          // model name -> {root, fields, charts}
    detailId: null,
    detailTerminal: false,
  };

  // -- small helpers ------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        var value = attrs[name];
        if (value === null || value === undefined || value === false) return;
        if (name === "class") el.className = value;
        else if (name === "text") el.textContent = value;
        else el.setAttribute(name, value === true ? "" : String(value));
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      el.appendChild(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
    }
    return el;
  }

  function setText(el, text) {
    text = text === null || text === undefined ? "" : String(text);
    if (el.textContent !== text) el.textContent = text;
  }

  function fmtInt(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
  }

  function fmtRate(n) {
    if (n === null || n === undefined) return "–";
    if (n >= 100) return Math.round(n).toLocaleString("en-US");
    if (n >= 10) return n.toFixed(1);
    return n.toFixed(2);
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " m " + Math.floor(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " m";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms === 0) return "0";
    if (ms < 1) return ms.toFixed(2) + " ms";
    if (ms < 1000) return (ms < 10 ? ms.toFixed(1) : Math.round(ms)) + " ms";
    return fmtSeconds(ms / 1000);
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    var d = new Date(iso);
    if (isNaN(d)) return String(iso);
    return d.toLocaleTimeString("en-GB", { hour12: false });
  }

  function fmtDateTime(iso) {
    if (!iso) return "–";
    var d = new Date(iso);
    if (isNaN(d)) return String(iso);
    var ms = String(d.getMilliseconds()).padStart(3, "0");
    return d.toLocaleDateString("en-CA") + " " + d.toLocaleTimeString("en-GB", { hour12: false }) + "." + ms;
  }

  function ago(iso) {
    if (!iso) return "–";
    var s = (Date.now() - new Date(iso).getTime()) / 1000;
    return fmtSeconds(Math.max(0, s)) + " ago";
  }

  function between(a, b) {
    if (!a || !b) return null;
    return (new Date(b).getTime() - new Date(a).getTime()) / 1000;
  }

  // -- key and fetch --------------------------------------------------------

  function loadKey() {
    try { return window.sessionStorage.getItem(KEY_STORAGE); } catch (e) { return null; }
  }

  function saveKey(key) {
    try {
      if (key) window.sessionStorage.setItem(KEY_STORAGE, key);
      else window.sessionStorage.removeItem(KEY_STORAGE);
    } catch (e) { /* storage off: the key lives in memory only */ }
    state.key = key;
  }

  function ApiFailure(status, detail) {
    this.status = status;
    this.detail = detail;
  }

  function api(path) {
    return fetch(path, {
      headers: { "Authorization": "Api-Key " + state.key, "Accept": "application/json" },
      cache: "no-store",
      credentials: "omit",
    }).then(function (response) {
      return response.text().then(function (text) {
        var body = null;
        try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
        if (!response.ok) {
          throw new ApiFailure(response.status, body && body.detail ? body.detail : response.statusText);
        }
        return body;
      });
    });
  }

  // -- status line, banners, views ----------------------------------------------

  function live(kind, text) {
    $("live").setAttribute("data-state", kind);
    setText($("live-text"), text);
  }

  function banner(text, kind) {
    var el = $("banner");
    if (!text) { el.hidden = true; return; }
    el.setAttribute("data-kind", kind || "warn");
    setText(el, text);
    el.hidden = false;
  }

  function showLogin(message) {
    stopPolling();
    $("login").hidden = false;
    $("overview").hidden = true;
    $("detail").hidden = true;
    $("change-key").hidden = true;
    banner(null);
    var msg = $("login-message");
    msg.hidden = !message;
    setText(msg, message || "");
    live("idle", "not connected");
    var input = $("api-key");
    input.value = "";
    input.focus();
  }

  function route() {
    var match = /^#\/request\/([0-9a-fA-F-]{36})$/.exec(window.location.hash);
    return match ? match[1].toLowerCase() : null;
  }

  function showCurrentView() {
    if (!state.key) { showLogin(null); return; }
    $("login").hidden = true;
    $("change-key").hidden = false;
    var id = route();
    if (id) {
      $("overview").hidden = true;
      $("detail").hidden = false;
      if (state.detailId !== id) openDetail(id);
    } else {
      state.detailId = null;
      $("detail").hidden = true;
      $("overview").hidden = state.summary === null;
    }
    startPolling();
  }

  // -- polling ------------------------------------------------------------------

  function stopPolling() {
    if (state.timer) window.clearTimeout(state.timer);
    state.timer = null;
  }

  function startPolling() {
    stopPolling();
    tick();
  }

  function schedule() {
    stopPolling();
    state.timer = window.setTimeout(tick, REFRESH_MS);
  }

  function tick() {
    if (!state.key) return;
    if (document.hidden) { schedule(); return; }  // no polling from a background tab
    if (state.inflight) return;
    state.inflight = true;
    if (!state.summary) live("loading", "loading…");
    var work = route() ? refreshDetail() : refreshSummary();
    work.then(function () {
      state.inflight = false;
      if (state.key) schedule();
    }, function (error) {
      state.inflight = false;
      handleFailure(error);
    });
  }

  function handleFailure(error) {
    if (error instanceof ApiFailure && error.status === 401) {
      saveKey(null);
      showLogin("That key was not accepted (401): it is unknown or revoked.");
      return;
    }
    if (error instanceof ApiFailure && error.status === 403) {
      saveKey(null);
      state.summary = null;
      clearModels();
      showLogin("This key is not an admin key (403). The dashboard shows every key's requests, "
        + "so it needs an admin key.");
      return;
    }
    var text = error instanceof ApiFailure
      ? "The server answered " + error.status + ": " + error.detail
      : "Could not reach the server (" + (error && error.message ? error.message : error) + ")";
    banner(text + ". Retrying every " + REFRESH_MS / 1000 + " s.", "error");
    live("error", "error · retrying");
    schedule();
  }

  function refreshSummary() {
    return api(SUMMARY_URL).then(function (summary) {
      state.summary = summary;
      banner(null);
      if (!route()) $("overview").hidden = false;
      render(summary);
      live("ok", "live · updated " + fmtTime(summary.generated_at) + " · every " + REFRESH_MS / 1000 + " s");
    });
  }

  // -- overview ------------------------------------------------------------------

  function tile(label, value, sub, cls, testid) {
    return h("div", { class: "card tile" + (cls ? " " + cls : ""), "data-tile": testid },
      h("div", { class: "label", text: label }),
      value,
      sub ? h("div", { class: "sub", text: sub }) : null);
  }

  function renderTiles(s) {
    var t = s.totals;
    var box = $("tiles");
    var inProgress = h("div", { class: "value" }, fmtInt(t.in_progress),
      h("span", { class: "of", text: " / " + fmtInt(t.capacity) }));
    var tiles = [
      tile("Queued", h("div", { class: "value", "data-field": "total-queued", text: fmtInt(t.queued) }),
        t.models + (t.models === 1 ? " model" : " models")),
      tile("In progress", inProgress, "against capacity"),
      tile("Finished · 1 h", h("div", { class: "value", text: fmtInt(t.finished_last_hour) }),
        fmtRate(t.finished_last_hour / 60) + " per minute"),
      tile("Failed · 1 h", h("div", { class: "value", "data-field": "total-failed", text: fmtInt(t.failed_last_hour) }),
        null, t.failed_last_hour ? "bad" : ""),
      tile("Expired · 1 h", h("div", { class: "value", text: fmtInt(t.expired_last_hour) }), null,
        t.expired_last_hour ? "warn" : ""),
      tile("Workers alive", h("div", { class: "value", "data-field": "workers-alive", text: fmtInt(t.workers_alive) }),
        t.workers_unresponsive ? t.workers_unresponsive + " unresponsive" : "all responsive",
        t.workers_unresponsive ? "warn-sub" : (t.workers_alive ? "" : "bad")),
      tile("Stuck", h("div", { class: "value", text: fmtInt(t.stuck_requests) }), "lease expired or worker silent",
        t.stuck_requests ? "bad" : ""),
    ];
    box.replaceChildren.apply(box, tiles);
  }

  function render(s) {
    renderTiles(s);
    renderModels(s);
    renderWorkers(s.workers);
    renderStuck(s.stuck_requests);
    renderFailures(s.recent_failures);
  }

  // -- model cards -----------------------------------------------------------------

  var PRIORITIES = [["-1", "RT", "p-rt", "real time"], ["0", "P0", "p0", "priority 0"],
    ["1", "P1", "p1", "priority 1"], ["2", "P2", "p2", "priority 2"]];

  function stat(label, valueEl, extra, cls) {
    return h("div", { class: "stat" + (cls ? " " + cls : "") }, h("div", { class: "label", text: label }), valueEl, extra);
  }

  function createCard(name) {
    var f = {};
    f.paused = h("span", { class: "badge s-paused", text: "paused", hidden: true });
    f.capacityNote = h("span", { class: "muted" });
    f.queued = h("div", { class: "value", "data-field": "queued" });
    f.prio = h("div", { class: "prio" });
    f.chips = {};
    PRIORITIES.forEach(function (p) {
      var chip = h("span", { class: "chip " + p[2], title: p[3], "data-field": "queued-" + p[0] });
      f.chips[p[0]] = chip;
      f.prio.appendChild(chip);
    });
    f.inProgress = h("span", { "data-field": "in_progress" });
    f.capacity = h("span", { "data-field": "capacity" });
    f.fill = h("div", { class: "fill" });
    f.oldest = h("div", { class: "value", "data-field": "oldest_queued_age" });
    f.throughput = h("div", { class: "value", "data-field": "throughput_per_minute" });
    f.failed = h("div", { class: "value", "data-field": "failed" });
    f.expired = h("div", { class: "value", "data-field": "expired" });
    f.failedStat = stat("Failed · 1 h", f.failed, h("div", { class: "sub", text: "model errors, attempts used up" }));
    f.expiredStat = stat("Expired · 1 h", f.expired, h("div", { class: "sub", text: "never started in time" }));
    f.oldestStat = stat("Oldest queued", f.oldest, h("div", { class: "sub", text: "age of the longest wait" }));
    f.throughputSub = h("div", { class: "sub" });

    var root = h("article", { class: "card model", "data-model": name },
      h("div", { class: "model-head" }, h("h3", { text: name }), f.paused, f.capacityNote),
      h("div", { class: "stats" },
        stat("Queued", f.queued, f.prio),
        stat("In progress", h("div", { class: "value" }, f.inProgress, h("span", { class: "of" }, " / ", f.capacity)),
          h("div", { class: "bar" }, f.fill)),
        f.oldestStat,
        stat("Throughput", f.throughput, f.throughputSub),
        f.failedStat,
        f.expiredStat),
      h("div", { class: "charts" },
        h("figure", null, h("figcaption", { text: "Finished per minute · last hour" }),
          f.tpBox = h("div", { class: "chart", "data-chart": "throughput" })),
        h("figure", null, h("figcaption", { text: "Time in queue p50 / p95 · 5-minute buckets" }),
          f.tqBox = h("div", { class: "chart", "data-chart": "time-in-queue" }))));
    return { root: root, f: f, tp: null, tq: null };
  }

  function clearModels() {
    Object.keys(state.cards).forEach(function (name) { destroyCard(name); });
    $("models").replaceChildren();
  }

  function destroyCard(name) {
    var card = state.cards[name];
    if (!card) return;
    if (card.tp) card.tp.destroy();
    if (card.tq) card.tq.destroy();
    if (card.observer) card.observer.disconnect();
    card.root.remove();
    delete state.cards[name];
  }

  function renderModels(s) {
    var box = $("models");
    var seen = {};
    s.models.forEach(function (m, index) {
      seen[m.model] = true;
      var card = state.cards[m.model];
      if (!card) {
        card = state.cards[m.model] = createCard(m.model);
      }
      if (box.children[index] !== card.root) box.insertBefore(card.root, box.children[index] || null);
      updateCard(card, m, s);
    });
    Object.keys(state.cards).forEach(function (name) { if (!seen[name]) destroyCard(name); });
    if (!s.models.length) {
      box.replaceChildren(h("div", { class: "card tile muted", text: "No models yet: create one with PUT /v1/models/{model}." }));
    } else if (box.firstChild && !box.firstChild.getAttribute("data-model")) {
      box.firstChild.remove();
    }
  }

  function updateCard(card, m, s) {
    var f = card.f;
    f.paused.hidden = !m.paused;
    setText(f.capacityNote, "capacity " + fmtInt(m.capacity) + (m.max_queue_depth !== null ?
      " · queue limit " + fmtInt(m.max_queue_depth) : ""));
    setText(f.queued, fmtInt(m.queued));
    PRIORITIES.forEach(function (p) {
      var n = m.queued_by_priority[p[0]] || 0;
      setText(f.chips[p[0]], p[1] + " " + fmtInt(n));
      f.chips[p[0]].classList.toggle("zero", n === 0);
    });
    setText(f.inProgress, fmtInt(m.in_progress));
    setText(f.capacity, fmtInt(m.capacity));
    var ratio = m.capacity > 0 ? Math.min(1, m.in_progress / m.capacity) : (m.in_progress ? 1 : 0);
    f.fill.style.width = (ratio * 100).toFixed(1) + "%";
    f.fill.classList.toggle("full", ratio >= 1);
    setText(f.oldest, m.oldest_queued_age_seconds === null ? "–" : fmtSeconds(m.oldest_queued_age_seconds));
    f.oldestStat.classList.toggle("warn", (m.oldest_queued_age_seconds || 0) > 60);
    setText(f.throughput, fmtRate(m.throughput_per_minute));
    var finished = m.last_hour.succeeded + m.last_hour.failed + m.last_hour.expired + m.last_hour.canceled;
    setText(f.throughputSub, "per minute · " + fmtInt(finished) + " finished in 1 h");
    setText(f.failed, fmtInt(m.last_hour.failed));
    f.failedStat.classList.toggle("bad", m.last_hour.failed > 0);
    setText(f.expired, fmtInt(m.last_hour.expired));
    f.expiredStat.classList.toggle("warn", m.last_hour.expired > 0);
    drawCharts(card, m, s);
  }

  // -- charts (uPlot) ------------------------------------------------------------------

  var COLORS = { finished: "#3b82f6", failed: "#ef4444", p50: "#2563eb", p95: "#f59e0b" };
  var AXIS = { stroke: "#6b7280", grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#e5e7eb", width: 1 },
    font: "11px system-ui, sans-serif" };

  function chartWidth(box) {
    return Math.max(240, Math.floor(box.clientWidth || box.getBoundingClientRect().width || 480));
  }

  function throughputData(m) {
    var t = m.throughput;
    var finished = [];
    var bad = [];
    for (var i = 0; i < t.t.length; i++) {
      var all = t.succeeded[i] + t.failed[i] + t.expired[i] + t.canceled[i];
      var failed = t.failed[i] + t.expired[i];
      finished.push(all || null);
      bad.push(failed || null);
    }
    return [t.t, finished, bad];
  }

  function timeInQueueData(m) {
    var q = m.time_in_queue;
    return [q.t, q.p50_ms, q.p95_ms];
  }

  function zeroBased(u, min, max) {
    return [0, max > 0 ? max * 1.15 : 1];
  }

  function hhmm(seconds) {
    var d = new Date(seconds * 1000);
    return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  }

  // Legend values: blank while the cursor is off the chart, so the legend reads as a key.
  function legendTime(u, v, series, idx) { return idx === null || v === null ? "" : hhmm(v); }
  function legendCount(u, v, series, idx) { return idx === null ? "" : fmtInt(v || 0); }
  function legendMs(u, v, series, idx) { return idx === null ? "" : fmtMs(v); }
  var TIME_AXIS = { space: 70, values: function (u, ticks) { return ticks.map(hhmm); } };

  function makeThroughputChart(box) {
    var bars = uPlot.paths.bars({ size: [0.75, 40], align: 0 });
    return new uPlot({
      width: chartWidth(box),
      height: 150,
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: zeroBased } },
      legend: { show: true, live: true },
      axes: [
        Object.assign({}, AXIS, TIME_AXIS),
        Object.assign({}, AXIS, { size: 48, values: function (u, ticks) {
          return ticks.map(function (v) { return Number.isInteger(v) ? fmtInt(v) : ""; });
        } }),
      ],
      series: [
        { label: "", value: legendTime },
        { label: "finished", stroke: COLORS.finished, fill: "rgba(59,130,246,0.35)", width: 1, paths: bars,
          points: { show: false }, value: legendCount },
        { label: "failed + expired", stroke: COLORS.failed, fill: "rgba(239,68,68,0.6)", width: 1, paths: bars,
          points: { show: false }, value: legendCount },
      ],
    }, [[], [], []], box);
  }

  function makeTimeInQueueChart(box) {
    return new uPlot({
      width: chartWidth(box),
      height: 150,
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: zeroBased } },
      legend: { show: true, live: true },
      axes: [
        Object.assign({}, AXIS, TIME_AXIS),
        Object.assign({}, AXIS, { size: 64, values: function (u, ticks) { return ticks.map(fmtMs); } }),
      ],
      series: [
        { label: "", value: legendTime },
        { label: "p50", stroke: COLORS.p50, width: 2, spanGaps: false, points: { show: true, size: 5 },
          value: legendMs },
        { label: "p95", stroke: COLORS.p95, width: 2, spanGaps: false, points: { show: true, size: 5 },
          value: legendMs },
      ],
    }, [[], [], []], box);
  }

  function drawCharts(card, m) {
    if (typeof uPlot === "undefined") return;
    var f = card.f;
    if (!card.tp) card.tp = makeThroughputChart(f.tpBox);
    if (!card.tq) card.tq = makeTimeInQueueChart(f.tqBox);
    card.tp.setData(throughputData(m));
    card.tq.setData(timeInQueueData(m));
    if (!card.observer && typeof ResizeObserver !== "undefined") {
      card.observer = new ResizeObserver(function () {
        card.tp.setSize({ width: chartWidth(f.tpBox), height: 150 });
        card.tq.setSize({ width: chartWidth(f.tqBox), height: 150 });
      });
      card.observer.observe(f.tpBox);
      card.observer.observe(f.tqBox);
    }
  }

  // -- tables ----------------------------------------------------------------------------

  function fillTable(table, rows, empty, columns) {
    var body = table.tBodies[0];
    if (!rows.length) {
      body.replaceChildren(h("tr", null, h("td", { class: "empty", colspan: columns, text: empty })));
      return;
    }
    body.replaceChildren.apply(body, rows);
  }

  function requestLink(id) {
    return h("a", { href: "#/request/" + id, class: "mono", "data-request-id": id, text: id });
  }

  function renderWorkers(workers) {
    var rows = workers.map(function (w) {
      var status = w.alive ? "alive" : (w.state === "stopped" ? "stopped" : "unresponsive");
      return h("tr", { "data-worker-id": w.id },
        h("td", null, h("span", { class: "alive-dot " + (w.alive ? "on" : (w.state === "stopped" ? "" : "off")) }),
          w.name, h("span", { class: "muted", text: " #" + w.id })),
        h("td", { class: "mono", text: w.hostname + " · " + w.pid }),
        h("td", { class: "mono", text: (w.models || []).join(", ") || "–" }),
        h("td", null, h("span", { class: "badge s-" + status, text: status }),
          w.state !== "stopped" && w.state !== "healthy" ? h("span", { class: "muted", text: " " + w.state }) : null,
          w.detail ? h("div", { class: "muted", text: w.detail }) : null),
        h("td", { class: "num", text: fmtSeconds(w.heartbeat_age_seconds) }),
        h("td", { class: "num", "data-field": "held_leases", text: fmtInt(w.held_leases) }),
        h("td", { text: ago(w.started_at) }));
    });
    var alive = workers.filter(function (w) { return w.alive; }).length;
    setText($("workers-note"), alive + " alive of " + workers.length + " shown (running, or stopped within the hour)");
    fillTable($("workers"), rows, "No workers in the last hour.", 7);
  }

  function renderStuck(stuck) {
    $("stuck-section").hidden = !stuck.length;
    fillTable($("stuck"), stuck.map(function (r) {
      return h("tr", null,
        h("td", null, requestLink(r.request_id)),
        h("td", { class: "mono", text: r.model }),
        h("td", { class: "num", text: r.attempt }),
        h("td", { text: r.worker_name ? r.worker_name + " #" + r.worker_id : "–" }),
        h("td", { text: r.reason }),
        h("td", { class: "num", text: fmtSeconds(r.running_seconds) }));
    }), "None.", 6);
  }

  function errorPreview(text) {
    if (!text) return "";
    try {
      var value = JSON.parse(text);
      if (value && typeof value === "object" && value.message) return String(value.message);
      return typeof value === "string" ? value : text;
    } catch (e) {
      return text;  // cut by the server: not valid JSON any more
    }
  }

  function renderFailures(failures) {
    fillTable($("failures"), failures.map(function (r) {
      var preview = errorPreview(r.error);
      return h("tr", { "data-request-id": r.request_id },
        h("td", null, requestLink(r.request_id)),
        h("td", { class: "mono", text: r.model }),
        h("td", null, h("span", { class: "badge s-" + r.state, text: r.state })),
        h("td", { class: "num", text: r.attempts }),
        h("td", { title: fmtDateTime(r.finished_at), text: ago(r.finished_at) }),
        h("td", { class: "error", title: r.error || "", text: preview || (r.state === "EXPIRED" ? "not started before its deadline" : "–") }));
    }), "No failed or expired requests in the last hour.", 6);
  }

  // -- request detail ----------------------------------------------------------------------

  var TERMINAL = { SUCCEEDED: 1, FAILED: 1, CANCELED: 1, EXPIRED: 1, WEBHOOK_FAILED: 1 };

  function openDetail(id) {
    state.detailId = id;
    state.detailTerminal = false;
    setText($("detail-id"), id);
    setText($("detail-status"), "…");
    $("detail-status").className = "badge";
    $("detail-message").hidden = true;
    $("detail-facts").replaceChildren();
    $("detail-error").hidden = true;
    $("detail-output-text").hidden = true;
    setText($("detail-output-text"), "");
    setText($("detail-output-link"), "");
    $("detail-output-load").hidden = true;
    $("detail-events").tBodies[0].replaceChildren();
    window.scrollTo(0, 0);
  }

  function fact(label, value, field) {
    return h("div", null, h("dt", { text: label }), h("dd", { "data-field": field, text: value }));
  }

  function refreshDetail() {
    var id = route();
    if (state.detailTerminal && state.detailId === id) {
      live("ok", "request finished · not refreshing");
      return Promise.resolve();
    }
    var base = "/v1/async_request/" + encodeURIComponent(id);
    return Promise.all([api(base), api(base + "/events")]).then(function (answers) {
      if (route() !== id) return;
      renderDetail(answers[0], answers[1].events || []);
      live("ok", "live · updated " + fmtTime(new Date().toISOString()) + " · every " + REFRESH_MS / 1000 + " s");
    }, function (error) {
      if (error instanceof ApiFailure && error.status === 404) {
        var msg = $("detail-message");
        setText(msg, "No request " + id + " for this key (404).");
        msg.hidden = false;
        state.detailTerminal = true;
        return;
      }
      throw error;
    });
  }

  function renderDetail(r, events) {
    var status = $("detail-status");
    setText(status, r.status);
    status.className = "badge s-" + r.status;
    status.setAttribute("data-field", "status");
    var runSeconds = between(r.started_at, r.finished_at);
    var facts = [
      fact("Model", r.model, "model"),
      fact("Priority", String(r.priority), "priority"),
      fact("Attempts", String(r.attempts), "attempts"),
      fact("Webhook", r.webhook_status, "webhook_status"),
      fact("Created", fmtDateTime(r.created_at), "created_at"),
      fact("Started", fmtDateTime(r.started_at), "started_at"),
      fact("Finished", fmtDateTime(r.finished_at), "finished_at"),
      fact("Time in queue", fmtMs(r.time_in_queue_ms), "time_in_queue"),
      fact("Run time", runSeconds === null ? "–" : fmtMs(runSeconds * 1000), "run_time"),
    ];
    if (r.queue_position !== undefined) facts.push(fact("Queue position", fmtInt(r.queue_position), "queue_position"));
    $("detail-facts").replaceChildren.apply($("detail-facts"), facts);

    var hasError = r.error !== undefined && r.error !== null;
    $("detail-error").hidden = !hasError;
    if (hasError) setText($("detail-error-text"), JSON.stringify(r.error, null, 2));

    var link = $("detail-output-link");
    var button = $("detail-output-load");
    button.setAttribute("data-request-id", r.request_id);
    if (r.output_url) {
      var safe = /^https?:\/\//i.test(r.output_url);
      link.replaceChildren("Stored at ", safe
        ? h("a", { href: r.output_url, target: "_blank", rel: "noopener noreferrer", class: "mono", text: r.output_url })
        : h("code", { text: r.output_url }));
    } else if (r.status === "SUCCEEDED" || r.status === "FAILED" || r.status === "WEBHOOK_FAILED") {
      link.replaceChildren("Kept inline: ", h("code", { text: "GET /v1/async_request/" + r.request_id + "/output" }));
    } else {
      link.replaceChildren(TERMINAL[r.status] ? "This request ended without an output." : "No output yet: the request is " + r.status + ".");
    }
    button.hidden = !(r.status === "SUCCEEDED" || r.status === "FAILED" || r.status === "WEBHOOK_FAILED");

    var rows = events.map(function (e) {
      return h("tr", { "data-event-kind": e.kind },
        h("td", { class: "num", text: e.id }),
        h("td", { class: "mono", text: fmtDateTime(e.at) }),
        h("td", null, h("strong", { text: e.kind })),
        h("td", null, e.state ? h("span", { class: "badge s-" + e.state, text: e.state }) : "–"),
        h("td", { class: "num", text: e.attempt === undefined ? "–" : e.attempt }),
        h("td", { class: "num", text: e.worker_id === undefined ? "–" : "#" + e.worker_id }),
        h("td", { class: "detail-json", text: e.detail === undefined ? "" : JSON.stringify(e.detail) }));
    });
    fillTable($("detail-events"), rows, "No events.", 7);
    state.detailTerminal = !!TERMINAL[r.status] && r.status !== "WEBHOOK_FAILED" && r.webhook_status !== "PENDING";
  }

  function loadOutput() {
    var id = route();
    if (!id) return;
    var pre = $("detail-output-text");
    api("/v1/async_request/" + encodeURIComponent(id) + "/output").then(function (body) {
      var text = JSON.stringify(body, null, 2);
      if (text.length > 20000) text = text.slice(0, 20000) + "\n… (cut at 20 000 characters)";
      setText(pre, text);
      pre.hidden = false;
    }, function (error) {
      setText(pre, error instanceof ApiFailure ? error.status + ": " + error.detail : String(error));
      pre.hidden = false;
    });
  }

  // -- wiring -----------------------------------------------------------------------------

  $("login-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var key = $("api-key").value.trim();
    if (!key) return;
    saveKey(key);
    $("api-key").value = "";
    $("login-message").hidden = true;
    showCurrentView();
  });

  $("change-key").addEventListener("click", function () {
    saveKey(null);
    state.summary = null;
    clearModels();
    showLogin(null);
  });

  $("detail-output-load").addEventListener("click", loadOutput);

  window.addEventListener("hashchange", function () {
    if (!route()) state.detailId = null;
    showCurrentView();
  });

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && state.key) startPolling();
  });

  state.key = loadKey();
  showCurrentView();
})();
