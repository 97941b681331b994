// nacguard operator page. Plain JavaScript, no dependencies, no build step.
// Every value shown comes from the server or the user: the DOM is built with createElement and
// textContent only (never innerHTML), so nothing shown can turn into markup or script.
"use strict";

(function () {
  const KEY_STORAGE = "nacguard.apiKey";
  const WATCH_EVERY_MS = 3000;
  const HISTORY_POINTS = 60; // three minutes of polls
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    view: "try",
    calibration: null, // GET /v1/calibration
    previousStats: null, // last /v1/stats answer, for rates between two polls
    history: new Map(), // model key -> [{t, rate, p99}], the last few minutes of polls
    watchTimer: null,
    reviewLoaded: false,
  };

  // ---------------------------------------------------------------- DOM helpers
  function el(tag, props, children) {
    const node = document.createElement(tag);
    applyProps(node, props);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      node.setAttribute(name, String(value));
    }
    append(node, children);
    return node;
  }

  function applyProps(node, props) {
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, String(value));
    }
  }

  function append(node, children) {
    if (children === undefined || children === null) return;
    for (const child of Array.isArray(children) ? children : [children]) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  const $ = (id) => document.getElementById(id);

  function num(value, digits) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "—";
    return value.toFixed(digits === undefined ? 3 : digits);
  }

  function pct(value, digits) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "—";
    return (value * 100).toFixed(digits === undefined ? 1 : digits) + "%";
  }

  // ---------------------------------------------------------------- API access
  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (e) {
      return "";
    }
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, options) {
    const opts = Object.assign({ method: "GET" }, options || {});
    const headers = new Headers(opts.headers || {});
    const key = apiKey();
    if (key) headers.set("X-API-Key", key);
    opts.headers = headers;
    opts.credentials = "omit";
    opts.cache = "no-store";
    const response = await fetch(path, opts);
    if (!response.ok) {
      let code = "http_" + response.status;
      let message = response.statusText || "request failed";
      try {
        const body = await response.json();
        if (body && body.error) {
          code = String(body.error.code || code);
          message = String(body.error.message || message);
        }
      } catch (e) {
        // not JSON: keep the status text
      }
      if (response.status === 401) needKey(message);
      throw new ApiError(response.status, code, message);
    }
    return response;
  }

  async function apiJson(path, options) {
    return (await api(path, options)).json();
  }

  function notice(text) {
    const box = $("notice");
    if (!text) {
      box.hidden = true;
      box.textContent = "";
      return;
    }
    box.textContent = text;
    box.hidden = false;
  }

  // ---------------------------------------------------------------- API key bar
  function needKey(message) {
    stopWatch(); // no point polling with a key the server refuses
    showKeyForm(true);
    $("key-hint").textContent = apiKey() && message
      ? "The server refused this key (" + message + ")."
      : "This server needs an API key.";
  }

  function showKeyForm(show) {
    $("key-form").hidden = !show;
    $("key-toggle").setAttribute("aria-expanded", show ? "true" : "false");
    if (show) $("key-input").focus();
  }

  function refreshKeyButton() {
    const has = Boolean(apiKey());
    $("key-toggle").classList.toggle("has-key", has);
    $("key-toggle").textContent = has ? "API key ✓" : "API key";
  }

  function setupKeyForm() {
    $("key-toggle").addEventListener("click", () => showKeyForm($("key-form").hidden));
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("key-input").value.trim();
      try {
        if (value) sessionStorage.setItem(KEY_STORAGE, value);
        else sessionStorage.removeItem(KEY_STORAGE);
      } catch (e) {
        // storage refused (private mode): the key lives until reload only
      }
      $("key-input").value = "";
      $("key-hint").textContent = "";
      showKeyForm(false);
      refreshKeyButton();
      notice("");
      loadBasics();
      showView(state.view);
    });
    $("key-clear").addEventListener("click", () => {
      try {
        sessionStorage.removeItem(KEY_STORAGE);
      } catch (e) {
        // nothing stored
      }
      refreshKeyButton();
      $("key-hint").textContent = "Key forgotten.";
    });
    refreshKeyButton();
  }

  // ---------------------------------------------------------------- tabs
  function showView(view) {
    state.view = view;
    for (const button of document.querySelectorAll(".tabs button")) {
      button.setAttribute("aria-selected", button.dataset.view === view ? "true" : "false");
    }
    for (const name of ["try", "watch", "review"]) {
      $("view-" + name).hidden = name !== view;
    }
    if (location.hash !== "#" + view) history.replaceState(null, "", "#" + view);
    stopWatch();
    if (view === "watch") startWatch();
    if (view === "review") loadReview();
  }

  function setupTabs() {
    for (const button of document.querySelectorAll(".tabs button")) {
      button.addEventListener("click", () => showView(button.dataset.view));
    }
    window.addEventListener("hashchange", () => {
      const view = location.hash.replace("#", "");
      if (["try", "watch", "review"].includes(view) && view !== state.view) showView(view);
    });
    document.addEventListener("visibilitychange", () => {
      // Nobody looking: no polling.
      if (document.hidden) stopWatch();
      else if (state.view === "watch") startWatch();
    });
  }

  // ---------------------------------------------------------------- basics
  async function loadBasics() {
    try {
      state.calibration = await apiJson("/v1/calibration");
      const c = state.calibration;
      $("served").textContent = c.model + " · profile " + c.profile + " · threshold " + num(c.threshold);
    } catch (e) {
      $("served").textContent = e.status === 401 ? "API key needed" : "not ready: " + e.message;
    }
  }

  // ---------------------------------------------------------------- charts
  // Calibration histogram with the threshold and (optionally) one image's score marked.
  function scoreChart(calibration, score, ood) {
    const W = 340, H = 130, L = 8, R = 8, T = 16, B = 24;
    const hist = calibration.histogram;
    const root = svg("svg", {
      viewBox: "0 0 " + W + " " + H, class: "chart", role: "img",
      "aria-label": "calibration score histogram",
    });
    if (!hist || !hist.edges.length) return root;
    let lo = hist.edges[0], hi = hist.edges[hist.edges.length - 1];
    if (typeof score === "number" && Number.isFinite(score)) {
      lo = Math.min(lo, score);
      hi = Math.max(hi, score);
    }
    const pad = (hi - lo) * 0.03 || 0.01;
    lo -= pad;
    hi += pad;
    const x = (v) => L + ((v - lo) / (hi - lo)) * (W - L - R);
    const peak = Math.max(1, ...hist.counts);
    const y = (c) => H - B - (c / peak) * (H - B - T);
    hist.counts.forEach((count, i) => {
      const x0 = x(hist.edges[i]), x1 = x(hist.edges[i + 1]);
      root.append(svg("rect", {
        class: "calib", x: x0 + 0.5, y: y(count), width: Math.max(0.5, x1 - x0 - 1), height: H - B - y(count),
      }));
    });
    root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    const tx = x(calibration.threshold);
    root.append(svg("line", { class: "thr", x1: tx, x2: tx, y1: T - 6, y2: H - B }));
    root.append(svg("text", { x: tx + 3, y: T - 6 + 8, class: "label-thr" }, "threshold"));
    const tick = (v, anchor) =>
      svg("text", { x: x(v), y: H - 8, "text-anchor": anchor }, num(v, 2));
    root.append(tick(lo + pad, "start"), tick(hi - pad, "end"));
    if (typeof score === "number" && Number.isFinite(score)) {
      const sx = x(score), cls = ood ? "mark-ood" : "mark-ind";
      root.append(svg("line", { class: cls, x1: sx, x2: sx, y1: T, y2: H - B, "stroke-width": 2 }));
      root.append(svg("circle", { class: cls, cx: sx, cy: T, r: 4 }));
      const anchor = sx > W * 0.7 ? "end" : "start";
      root.append(svg("text", { x: sx + (anchor === "end" ? -6 : 6), y: T + 4, "text-anchor": anchor },
        "this image " + num(score)));
    }
    return root;
  }

  // Recent scores against the calibration shares, over the drift bins (equal calibration share).
  function driftChart(bins, counts) {
    const W = 560, H = 170, L = 30, R = 8, T = 12, B = 30;
    const root = svg("svg", {
      viewBox: "0 0 " + W + " " + H, class: "chart", role: "img",
      "aria-label": "recent score histogram against the calibration histogram",
    });
    const n = bins.expected.length;
    const total = counts.reduce((a, b) => a + b, 0);
    const observed = counts.map((c) => (total > 0 ? c / total : 0));
    const peak = Math.max(0.05, ...bins.expected, ...observed);
    const slot = (W - L - R) / n;
    const y = (share) => H - B - (share / peak) * (H - B - T);
    for (let i = 0; i < n; i++) {
      const x0 = L + i * slot;
      root.append(svg("rect", {
        class: "calib", x: x0 + 1, y: y(bins.expected[i]), width: slot / 2 - 1.5, height: H - B - y(bins.expected[i]),
      }));
      root.append(svg("rect", {
        class: "recent", x: x0 + slot / 2, y: y(observed[i] || 0), width: slot / 2 - 1.5,
        height: H - B - y(observed[i] || 0),
      }));
    }
    root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    root.append(svg("text", { x: L - 4, y: T + 4, "text-anchor": "end" }, pct(peak, 0)));
    root.append(svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "0"));
    const tx = L + bins.ood_bins * slot;
    root.append(svg("line", { class: "thr", x1: tx, x2: tx, y1: T, y2: H - B }));
    root.append(svg("text", { x: tx + 3, y: T + 8, class: "label-thr" }, "threshold"));
    root.append(svg("text", { x: L, y: H - 10 }, "← lower NAC score (less like training data)"));
    root.append(svg("text", { x: W - R, y: H - 10, "text-anchor": "end" }, "higher →"));
    return root;
  }

  function legend(items) {
    return el("div", { class: "legend" }, items.map(([cls, text]) => el("span", { class: cls, text })));
  }

  function bars(rows, lowIsBad) {
    return el("div", { class: "bars" }, rows.map(([label, value, shown]) => {
      const fill = el("div", { class: "fill" });
      fill.style.width = Math.max(0, Math.min(1, value)) * 100 + "%";
      return el("div", { class: "bar" + (lowIsBad && value < lowIsBad ? " low" : "") }, [
        el("span", { class: "lbl", text: label, title: label }),
        el("div", { class: "track" }, fill),
        el("span", { class: "num", text: shown }),
      ]);
    }));
  }

  // Per-layer scores share no fixed scale: bars relative to the largest, least covered in red.
  function layerBars(layers, least) {
    const entries = Object.entries(layers).map(([name, value]) => [name, Number(value)]);
    const peak = Math.max(1e-12, ...entries.map(([, v]) => (Number.isFinite(v) ? Math.abs(v) : 0)));
    const node = bars(entries.map(([name, v]) => [name, Number.isFinite(v) ? v / peak : 0, num(v)]));
    Array.from(node.children).forEach((row, i) => {
      if (entries[i][0] === least) row.classList.add("low");
    });
    return node;
  }

  function facts(rows) {
    return el("dl", { class: "facts" }, rows.map(([k, v, testid]) =>
      el("div", null, [el("dt", { text: k }), el("dd", { text: v, "data-field": testid })])));
  }

  // ---------------------------------------------------------------- Try
  function setupTry() {
    const input = $("file-input");
    const drop = $("drop");
    input.addEventListener("change", () => {
      tryFiles(Array.from(input.files || []));
      input.value = "";
    });
    drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      tryFiles(Array.from((event.dataTransfer && event.dataTransfer.files) || []));
    });
  }

  function tryFiles(files) {
    const results = $("results");
    for (const file of files) {
      const card = el("article", { class: "card pending", "data-file": file.name });
      results.prepend(card);
      predictOne(file, card);
    }
  }

  async function predictOne(file, card) {
    const url = URL.createObjectURL(file);
    const preview = el("img", { class: "preview", src: url, alt: "preview of " + file.name });
    const badge = el("span", { class: "badge pending", text: "scoring…" });
    card.append(el("div", { class: "card-head" }, [
      preview,
      el("div", { class: "card-title" }, [el("div", { class: "fname", text: file.name }), badge]),
    ]));
    // One image per request, so each image gets its own answer or its own error.
    const form = new FormData();
    form.append("images", file, file.name);
    try {
      if (!state.calibration) await loadBasics();
      const body = await apiJson("/predict?top_k=5&explain=true", { method: "POST", body: form });
      renderPrediction(card, badge, body, body.predictions[0]);
    } catch (e) {
      card.className = "card failed";
      badge.className = "badge warn";
      badge.textContent = "error";
      card.append(el("p", { class: "error-text", "data-field": "error", text: e.code ? e.code + ": " + e.message : String(e) }));
    }
  }

  function renderPrediction(card, badge, body, p) {
    const ood = p.ood === true;
    card.className = "card " + (ood ? "ood" : "ind");
    card.dataset.ood = ood ? "true" : "false";
    badge.className = "badge " + (ood ? "ood" : "ind");
    badge.textContent = ood ? "OOD · flagged" : "in-distribution";
    badge.setAttribute("data-field", "verdict");
    const title = card.querySelector(".card-title");
    title.insertBefore(el("div", { class: "pred", "data-field": "label", text: p.label }), badge);
    const rows = [
      ["NAC score", num(p.nac_score), "score"],
      ["threshold", num(p.threshold), "threshold"],
      ["confidence", pct(p.confidence), "confidence"],
    ];
    if (typeof p.p_value === "number") rows.push(["p-value", num(p.p_value, 4), "p_value"]);
    const version = p.version || body.version;
    if (version !== undefined && version !== null) rows.push(["version", String(version), "version"]);
    card.append(facts(rows));
    if (state.calibration) {
      card.append(el("div", null, [
        el("div", { class: "section-title", text: "score against the calibration scores" }),
        scoreChart(state.calibration, p.nac_score, ood),
        legend([["k-calib", "calibration (InD)"], ["k-thr", "threshold"], ["k-score", "this image"]]),
      ]));
    }
    if (Array.isArray(p.top_k) && p.top_k.length) {
      card.append(el("div", null, [
        el("div", { class: "section-title", text: "top classes" }),
        bars(p.top_k.map((t) => [t.label, t.confidence, pct(t.confidence)])),
      ]));
    }
    const layers = p.layers && typeof p.layers === "object" ? p.layers : null;
    if (layers && Object.keys(layers).length) {
      const least = p.least_covered_layer;
      card.append(el("div", { "data-field": "layers" }, [
        el("div", {
          class: "section-title",
          text: "per-layer coverage" + (least ? " · least covered: " + least : ""),
        }),
        layerBars(layers, least),
      ]));
    }
  }

  // ---------------------------------------------------------------- Watch
  function startWatch() {
    stopWatch();
    const tick = async () => {
      await refreshWatch();
      if (state.view === "watch" && !document.hidden) state.watchTimer = setTimeout(tick, WATCH_EVERY_MS);
    };
    tick();
  }

  function stopWatch() {
    if (state.watchTimer !== null) clearTimeout(state.watchTimer);
    state.watchTimer = null;
  }

  // p99 from cumulative histogram buckets (upper bounds), linear inside the bucket.
  function quantile(buckets, q) {
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (total <= 0) return null;
    const rank = q * total;
    let prevLe = 0, prevCount = 0;
    for (const [le, count] of buckets) {
      if (count >= rank) {
        if (le === null) return prevLe;
        const inside = count - prevCount;
        return inside > 0 ? prevLe + ((rank - prevCount) / inside) * (le - prevLe) : le;
      }
      prevLe = le === null ? prevLe : le;
      prevCount = count;
    }
    return prevLe;
  }

  function bucketDelta(now, before) {
    if (!before) return now;
    const old = new Map(before.map(([le, c]) => [le, c]));
    return now.map(([le, c]) => [le, c - (old.get(le) || 0)]);
  }

  async function refreshWatch() {
    let stats, drift;
    try {
      if (!state.calibration) await loadBasics();
      [stats, drift] = await Promise.all([apiJson("/v1/stats"), apiJson("/v1/drift")]);
    } catch (e) {
      $("watch-updated").textContent = "update failed: " + e.message;
      return;
    }
    const previous = state.previousStats;
    state.previousStats = stats;
    const box = $("watch-models");
    clear(box);
    for (const model of stats.models) {
      const before = previous && previous.models.find((m) => m.model === model.model && m.version === model.version);
      const seconds = previous ? Math.max(0.001, stats.time - previous.time) : null;
      let rate = null, p99 = null, p99Note = "since start";
      if (before && seconds) {
        rate = (model.requests - before.requests) / seconds;
        const delta = bucketDelta(model.latency_buckets, before.latency_buckets);
        p99 = quantile(delta, 0.99);
        p99Note = "last " + seconds.toFixed(0) + " s";
      }
      if (p99 === null) p99 = quantile(model.latency_buckets, 0.99);
      const key = model.model + "|" + (model.version || "");
      const points = state.history.get(key) || [];
      if (rate !== null) points.push({ t: stats.time, rate, p99: before ? p99 : null });
      while (points.length > HISTORY_POINTS) points.shift();
      state.history.set(key, points);
      box.append(modelPanel(model, drift, stats.drift_window, rate, p99, p99Note, points));
    }
    $("watch-updated").textContent = "updated " + new Date(stats.time * 1000).toLocaleTimeString();
  }

  function tile(key, value, sub, alert, field) {
    return el("div", { class: "tile" + (alert ? " alert" : "") }, [
      el("div", { class: "k", text: key }),
      el("div", { class: "v", text: value, "data-field": field }),
      el("div", { class: "s", text: sub }),
    ]);
  }

  // Request rate (left axis) and p99 latency (right axis) over the last polls.
  function historyChart(points) {
    const W = 360, H = 130, L = 34, R = 40, T = 10, B = 18;
    const root = svg("svg", {
      viewBox: "0 0 " + W + " " + H, class: "chart", role: "img",
      "aria-label": "request rate and p99 latency over the last minutes",
    });
    for (const f of [0, 0.5, 1]) {
      const gy = T + f * (H - T - B);
      root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: gy, y2: gy }));
    }
    if (points.length < 2) {
      root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "collecting…"));
      return root;
    }
    const t0 = points[0].t, t1 = points[points.length - 1].t;
    const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - R);
    const maxRate = Math.max(1, ...points.map((p) => p.rate));
    const p99s = points.map((p) => p.p99).filter((v) => v !== null);
    const maxP99 = Math.max(0.001, ...p99s);
    const line = (values, peak, cls) => {
      const coords = points
        .map((p, i) => [x(p.t), values[i]])
        .filter(([, v]) => v !== null)
        .map(([px, v]) => px.toFixed(1) + "," + (H - B - (v / peak) * (H - T - B)).toFixed(1));
      if (coords.length > 1) root.append(svg("polyline", { class: cls, points: coords.join(" ") }));
    };
    line(points.map((p) => p.rate), maxRate, "line-rate");
    line(points.map((p) => p.p99), maxP99, "line-p99");
    root.append(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, maxRate.toFixed(0) + "/s"));
    root.append(svg("text", { x: W - R + 4, y: T + 8 }, (maxP99 * 1000).toFixed(0) + " ms"));
    root.append(svg("text", { x: L, y: H - 4 }, Math.round(t1 - t0) + " s ago"));
    root.append(svg("text", { x: W - R, y: H - 4, "text-anchor": "end" }, "now"));
    return root;
  }

  function modelPanel(model, drift, window, rate, p99, p99Note, points) {
    const enough = drift.enough_samples;
    const oodAlert = enough && drift.ood_rate > 2 * drift.expected_ood_rate + 0.02;
    const name = model.model + (model.version ? " · v" + model.version : "");
    const head = el("div", { class: "model-head" }, [
      el("div", null, [
        el("h2", { text: name }),
        el("div", { class: "sub", text: "profile " + model.profile + " · drift window " + drift.scope }),
      ]),
      el("span", {
        class: "badge " + (drift.drifting ? "ood" : enough ? "ind" : "pending"),
        "data-field": "drifting",
        text: drift.drifting ? "drifting" : enough ? "no drift" : "collecting",
      }),
    ]);
    const tiles = el("div", { class: "tiles" }, [
      tile("OOD rate", enough ? pct(drift.ood_rate) : "—",
        "expected " + pct(drift.expected_ood_rate), oodAlert, "ood_rate"),
      tile("PSI", num(drift.psi), "alert above " + num(drift.psi_threshold, 2),
        drift.psi !== null && drift.psi > drift.psi_threshold, "psi"),
      tile("KS", num(drift.ks), "alert above " + num(drift.ks_threshold, 2),
        drift.ks !== null && drift.ks > drift.ks_threshold, "ks"),
      tile("scores in window", String(drift.samples),
        "over " + Math.round(drift.window_s) + " s · statistics from " + drift.min_samples, false, "samples"),
      tile("request rate", rate === null ? "—" : rate.toFixed(1) + "/s",
        model.requests + " /predict answered", false, "rate"),
      tile("p99 latency", p99 === null ? "—" : (p99 * 1000).toFixed(1) + " ms", p99Note, false, "p99"),
      tile("images flagged", String(model.images_ood), "of " + model.images_scored + " scored", false, "flagged"),
    ]);
    const charts = el("div", { class: "watch-charts" });
    if (state.calibration) {
      charts.append(el("div", { class: "chart-box" }, [
        el("div", { class: "section-title", text: "recent scores vs calibration (share per bin)" }),
        driftChart(state.calibration.drift_bins, window.counts),
        legend([["k-calib", "calibration"], ["k-recent", "recent window"], ["k-thr", "threshold"]]),
      ]));
    }
    const statuses = Object.entries(model.by_status).sort();
    charts.append(el("div", { class: "side-charts" }, [
      el("div", { class: "chart-box" }, [
        el("div", { class: "section-title", text: "request rate and p99 latency" }),
        historyChart(points),
        legend([["k-rate", "requests/s"], ["k-p99", "p99 latency"]]),
      ]),
      el("div", { class: "chart-box" }, [
        el("div", { class: "section-title", text: "/predict answers by status" }),
        statuses.length
          ? bars(statuses.map(([code, n]) => [code, n / Math.max(1, model.requests), String(n)]))
          : el("p", { text: "no requests yet" }),
      ]),
    ]));
    return el("section", { class: "model", "data-model": model.model }, [head, tiles, charts]);
  }

  // ---------------------------------------------------------------- Review
  async function loadReview() {
    const list = $("review-list");
    const status = $("review-state");
    let body;
    try {
      body = await apiJson("/v1/review?limit=48");
    } catch (e) {
      status.textContent = "could not load the review list: " + e.message;
      return;
    }
    clear(list);
    if (!body.enabled) {
      status.textContent = "Review recording is off on this server (set redis_url or review_dir).";
      $("review-export").disabled = true;
      return;
    }
    $("review-export").disabled = false;
    status.textContent = body.items.length
      ? body.items.length + " most recent flagged image(s) · store: " + body.backend
      : "Nothing flagged yet · store: " + body.backend;
    for (const item of body.items) list.append(reviewItem(item));
  }

  function reviewItem(item) {
    const card = el("article", { class: "ritem", "data-id": item.id });
    const picture = item.thumbnail && item.thumbnail.startsWith("data:image/png;base64,")
      ? el("img", { class: "thumb", src: item.thumbnail, alt: "flagged image " + item.id })
      : el("div", { class: "nothumb", text: "image not kept" });
    const when = typeof item.time === "number" ? new Date(item.time * 1000).toLocaleString() : "—";
    card.append(picture, el("div", { class: "meta" }, [
      el("strong", { text: item.label + " · score " + num(item.score) }),
      el("span", { text: "threshold " + num(item.threshold) + " · " + when }),
      el("span", { class: "id", text: (item.model || item.profile) }),
    ]));
    const buttons = {
      ind: el("button", { type: "button", class: "m-ind", text: "In-distribution", "data-mark": "ind" }),
      ood: el("button", { type: "button", class: "m-ood", text: "OOD", "data-mark": "ood" }),
    };
    const show = (mark) => {
      card.classList.toggle("marked-ind", mark === "ind");
      card.classList.toggle("marked-ood", mark === "ood");
      card.dataset.mark = mark || "";
      for (const [name, button] of Object.entries(buttons)) {
        button.classList.toggle("on", name === mark);
        button.setAttribute("aria-pressed", name === mark ? "true" : "false");
      }
    };
    for (const [name, button] of Object.entries(buttons)) {
      button.addEventListener("click", async () => {
        const next = card.dataset.mark === name ? null : name;
        try {
          const answer = await apiJson("/v1/review/" + encodeURIComponent(item.id) + "/mark", {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ mark: next }),
          });
          show(answer.mark);
        } catch (e) {
          notice("mark not saved: " + e.message);
        }
      });
    }
    card.append(el("div", { class: "marks" }, [buttons.ind, buttons.ood]));
    show(item.mark);
    return card;
  }

  async function exportReview() {
    try {
      const response = await api("/v1/review/export");
      const blob = await response.blob();
      const url = URL.createObjectURL(blob);
      const link = el("a", { href: url, download: "nacguard-review.zip" });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      notice("export failed: " + e.message);
    }
  }

  // ---------------------------------------------------------------- start
  document.addEventListener("DOMContentLoaded", () => {
    setupKeyForm();
    setupTabs();
    setupTry();
    $("review-refresh").addEventListener("click", loadReview);
    $("review-export").addEventListener("click", exportReview);
    start();
  });

  async function start() {
    const fromHash = location.hash.replace("#", "");
    const view = ["try", "watch", "review"].includes(fromHash) ? fromHash : "try";
    let config = { auth_required: false };
    try {
      config = await (await fetch("/ui/config", { cache: "no-store", credentials: "omit" })).json();
    } catch (e) {
      // an older server: find out from the first call
    }
    if (config.auth_required && !apiKey()) {
      // Ask first rather than collect a 401 from every panel.
      state.view = view;
      needKey("");
      $("served").textContent = "API key needed";
      return;
    }
    loadBasics();
    showView(view);
  }
})();
