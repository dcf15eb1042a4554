// bgproxy dashboard. Plain JavaScript, no build step and no library: it reads the /v1 API and the
// /v1/watch event stream (with fetch, so the bearer token can be sent; EventSource cannot send it)
// and drives the same API an operator's curl would, showing the API's own refusal text.
"use strict";

(() => {
  const TOKEN_KEY = "bgproxy.admin-token";
  const COLORS = ["blue", "green"];
  const HISTORY = 300; // sparkline points: 5 minutes at one a second (the server keeps the same)
  const STALE_MS = 5000; // no byte from the stream for this long: reconnect (counters come every second)
  const SVG = "http://www.w3.org/2000/svg";

  const model = {
    state: null, // WatchStateEvent.state (= GET /v1/state)
    drains: [],
    rollout: null,
    counters: null,
    series: { blue: { requests: [], errors: [] }, green: { requests: [], errors: [] } },
    interval: 1,
    skew: 0, // server clock minus ours, in ms: countdowns use the server's deadline
    eventsVersion: -1,
  };

  const $ = (id) => document.getElementById(id);
  const cards = {};
  let watchAbort = null;
  let running = false;
  let generation = 0; // each start() begins a new watch loop; an older one sees it and ends

  // ------------------------------------------------------------------------------ formatting

  function pct(ratio, digits = 2) {
    return ratio == null ? "–" : (ratio * 100).toFixed(digits) + "%";
  }

  function seconds(value) {
    if (value == null) return "–";
    if (value < 1) return (value * 1000).toFixed(value < 0.01 ? 1 : 0) + " ms";
    return value.toFixed(2) + " s";
  }

  function rate(n) {
    if (n == null) return "–";
    return (n >= 100 ? n.toFixed(0) : n.toFixed(1)) + "/s";
  }

  function duration(s) {
    if (s >= 3600 && s % 3600 === 0) return `${s / 3600} h`;
    if (s >= 60 && s % 60 === 0) return `${s / 60} min`;
    return `${s} s`;
  }

  function count(n) {
    return n == null ? "–" : n.toLocaleString("en-US");
  }

  function clock(iso) {
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleTimeString([], { hour12: false });
  }

  function stamp(iso) {
    const d = new Date(iso);
    if (isNaN(d)) return iso;
    const now = new Date();
    const day = d.toDateString() === now.toDateString() ? "" : d.toLocaleDateString() + " ";
    return day + d.toLocaleTimeString([], { hour12: false });
  }

  function ago(iso) {
    const ms = Date.now() + model.skew - Date.parse(iso);
    if (!isFinite(ms)) return "";
    const s = Math.max(0, Math.round(ms / 1000));
    return s < 60 ? `${s} s ago` : s < 3600 ? `${Math.floor(s / 60)} min ago` : `${Math.floor(s / 3600)} h ago`;
  }

  function left(iso) {
    const ms = Date.parse(iso) - (Date.now() + model.skew);
    const s = Math.max(0, Math.ceil(ms / 1000));
    return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function colorTag(color) {
    return el("span", { class: `tag-${color}`, text: color });
  }

  // ------------------------------------------------------------------------------ the API

  class Refusal extends Error {
    constructor(status, body) {
      const error = body && typeof body.error === "string" ? body.error : `HTTP ${status}`;
      super(error);
      this.status = status;
      this.error = error;
      this.detail = body && Array.isArray(body.detail) ? body.detail : [];
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function headers(extra = {}) {
    const h = { ...extra };
    const t = token();
    if (t) h.Authorization = `Bearer ${t}`;
    return h;
  }

  async function api(method, path, body, extra = {}) {
    const init = { method, headers: headers(extra), cache: "no-store" };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      throw new Refusal(0, { error: "bgproxy did not answer", detail: [String(err.message || err)] });
    }
    let data = null;
    try {
      data = await resp.json();
    } catch {
      data = null;
    }
    if (resp.status === 401) {
      askToken("The token was refused: enter a valid one.");
      throw new Refusal(401, data);
    }
    if (!resp.ok) throw new Refusal(resp.status, data);
    return data;
  }

  // ------------------------------------------------------------------------------ the token

  function askToken(message) {
    stop();
    sessionStorage.removeItem(TOKEN_KEY);
    $("dash").hidden = true;
    $("login").hidden = false;
    $("signout").hidden = true;
    setConn("connecting", "signed out");
    $("summary").textContent = "Admin token needed";
    const error = $("login-error");
    error.hidden = !message;
    error.textContent = message || "";
    $("token").focus();
  }

  async function useToken(event) {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    try {
      await start();
      $("token").value = "";
    } catch (err) {
      if (err.status !== 401) showFatal(err);
    }
  }

  function forgetToken() {
    askToken("");
  }

  // ------------------------------------------------------------------------------ the stream

  function setConn(state, text) {
    const conn = $("conn");
    conn.dataset.state = state;
    conn.textContent = text || state;
  }

  function stop() {
    running = false;
    generation += 1;
    if (watchAbort) watchAbort.abort();
    watchAbort = null;
  }

  async function watchLoop(mine) {
    const current = () => running && mine === generation;
    let delay = 250;
    while (current()) {
      const ctrl = new AbortController();
      watchAbort = ctrl;
      let timer = null;
      const arm = () => {
        clearTimeout(timer);
        timer = setTimeout(() => ctrl.abort(), STALE_MS);
      };
      try {
        arm();
        const resp = await fetch("/v1/watch", {
          headers: headers({ Accept: "text/event-stream" }),
          cache: "no-store",
          signal: ctrl.signal,
        });
        if (resp.status === 401) {
          clearTimeout(timer);
          askToken("The token was refused: enter a valid one.");
          return;
        }
        if (!resp.ok || !resp.body) throw new Error(`HTTP ${resp.status}`);
        delay = 250;
        setConn("live", "live");
        await readEvents(resp.body, arm, onEvent);
      } catch {
        // a network error, a stale stream or stop(): the loop decides
      } finally {
        clearTimeout(timer);
      }
      if (!current()) return;
      setConn("reconnecting", "reconnecting…");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 5000);
    }
  }

  // The text/event-stream format: "field: value" lines, an empty line ends an event, ":" a comment.
  async function readEvents(body, onBytes, handle) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let name = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      onBytes();
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) handle(name, data.join("\n"));
          name = "message";
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") name = val;
          else if (field === "data") data.push(val);
        }
      }
    }
  }

  function onEvent(name, text) {
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      return;
    }
    if (name === "state") onState(data);
    else if (name === "history") onHistory(data);
    else if (name === "counters") onCounters(data);
  }

  function onState(event) {
    model.skew = Date.parse(event.at) - Date.now();
    model.state = event.state;
    model.drains = event.drains;
    model.rollout = event.rollout;
    render();
    if (event.state.version !== model.eventsVersion) {
      loadEvents(event.state.version);
      loadFleet();
    }
  }

  function onHistory(event) {
    model.interval = event.interval;
    for (const color of COLORS) {
      model.series[color] = {
        requests: event[color].requests.slice(-HISTORY),
        errors: event[color].errors.slice(-HISTORY),
      };
    }
    for (const color of COLORS) renderSpark(color);
  }

  function onCounters(event) {
    model.skew = Date.parse(event.at) - Date.now();
    model.counters = event;
    for (const color of COLORS) {
      const s = model.series[color];
      s.requests.push(event.colors[color].requests);
      s.errors.push(event.colors[color].errors);
      if (s.requests.length > HISTORY) s.requests.splice(0, s.requests.length - HISTORY);
      if (s.errors.length > HISTORY) s.errors.splice(0, s.errors.length - HISTORY);
    }
    if (model.state) {
      if (Date.now() - fleetAt >= FLEET_EVERY) loadFleet();
      for (const color of COLORS) renderCounters(color);
      if (model.rollout && event.rollout && event.rollout.id === model.rollout.id) {
        renderEvidence(model.rollout, event.rollout.evidence);
      }
    }
  }

  // The fleet panel: only with a shared store; read every FLEET_EVERY ms with the counters, and on a
  // new version (so "applied" catches up as the nodes apply it).
  const FLEET_EVERY = 2000;
  let fleetAt = 0;

  async function loadFleet() {
    if (!model.state || model.state.store.backend === "file") {
      $("fleet").hidden = true;
      return;
    }
    fleetAt = Date.now();
    try {
      renderFleet(await api("GET", "/v1/fleet"));
    } catch (err) {
      $("fleet").hidden = false;
      $("fleet-store").textContent = `The nodes cannot be listed: ${err.error || err}`;
      $("fleet-store").className = "bad";
    }
  }

  function renderFleet(view) {
    const s = view.store;
    $("fleet").hidden = false;
    $("fleet-store").textContent =
      `${s.backend} ${s.where}: ${s.status}` + (s.error ? ` (${s.error})` : "") + ` · this node: ${s.node}`;
    $("fleet-store").className = s.status === "ok" ? "muted" : "bad";
    const rows = view.nodes.map((n) =>
      el(
        "tr",
        { "data-node": n.node },
        el("td", { text: n.leader ? `${n.node} (leads rollouts)` : n.node }),
        el("td", { text: String(n.version) }),
        el("td", { text: n.behind ? `${n.behind} behind` : "up to date" }),
        el("td", { text: n.lag === null ? "–" : `${(n.lag * 1000).toFixed(0)} ms` }),
        el("td", { text: `${n.seen_ago.toFixed(1)} s ago` }),
        el("td", { text: n.store }),
      ),
    );
    $("fleet-body").replaceChildren(...rows);
  }

  async function loadEvents(version) {
    try {
      const body = await api("GET", "/v1/events");
      model.eventsVersion = version;
      renderEvents(body.events);
    } catch {
      // shown again on the next state change
    }
  }

  // ------------------------------------------------------------------------------ rendering

  function field(card, name) {
    return card.querySelector(`[data-f="${name}"]`);
  }

  function buildCards() {
    const template = $("card-template");
    for (const color of COLORS) {
      const card = $(`card-${color}`);
      card.append(template.content.cloneNode(true));
      const name = field(card, "name");
      name.textContent = color;
      name.id = `title-${color}`;
      field(card, "spark-rate").setAttribute("aria-label", `${color}: requests per second, last 5 minutes`);
      field(card, "spark-errors").setAttribute("aria-label", `${color}: error ratio, last 5 minutes`);
      cards[color] = card;
    }
  }

  function statusOf(color) {
    const st = model.state;
    const pool = st.pools[color];
    if (pool.draining) return ["draining", "◐ draining"];
    if (pool.weight > 0) return ["live", st.active === color ? "● live" : "● live (split)"];
    return ["idle", "○ idle"];
  }

  function render() {
    const st = model.state;
    if (!st) return;
    const total = st.weights.blue + st.weights.green;
    const live = st.active ? `${st.active} is live` : `split blue ${st.weights.blue} / green ${st.weights.green}`;
    $("summary").textContent = `${live} · version ${st.version} · changed ${stamp(st.updated_at)}`;
    for (const color of COLORS) {
      const card = cards[color];
      const pool = st.pools[color];
      const [kind, label] = statusOf(color);
      card.dataset.state = kind;
      const badge = field(card, "status");
      badge.dataset.kind = kind;
      badge.textContent = label;
      const share = total ? pool.weight / total : 0;
      field(card, "share").textContent = pct(share, share * 100 % 1 ? 1 : 0);
      field(card, "weight").textContent = String(pool.weight);
      field(card, "share-bar").style.width = `${share * 100}%`;
      renderCounters(color);
    }
    renderControls();
    renderRollout();
    tick();
  }

  function renderCounters(color) {
    const card = cards[color];
    const st = model.state;
    const c = model.counters ? model.counters.colors[color] : null;
    const pool = st.pools[color];
    const windowView = c ? c.error_window : pool.error_window;
    field(card, "rate").textContent = c ? rate(c.requests / (model.counters.interval || 1)) : "–";
    field(card, "total").textContent = c ? `${count(c.requests_total)} since start` : "";
    const ratio = field(card, "error-ratio");
    ratio.textContent = pct(windowView.error_ratio);
    ratio.dataset.value = windowView.error_ratio == null ? "" : String(windowView.error_ratio);
    ratio.parentElement.toggleAttribute("data-bad", (windowView.errors || 0) > 0);
    field(card, "window").textContent = `(last ${windowView.window_seconds} s)`;
    field(card, "error-counts").textContent =
      windowView.requests == null ? "metrics off" : `${count(windowView.errors)} of ${count(windowView.requests)}`;
    field(card, "p50").textContent = c ? seconds(c.p50) : "–";
    field(card, "p99").textContent = c ? seconds(c.p99) : "–";
    field(card, "in-flight").textContent = count(c ? c.in_flight : pool.in_flight);
    field(card, "streams").textContent = count(c ? c.streams : pool.streams);
    renderUpstreams(color, c ? c.upstream_health : pool.upstream_health);
    renderSpark(color);
    renderDrain(color);
  }

  function renderUpstreams(color, ups) {
    const list = field(cards[color], "upstreams");
    const items = ups.map((u) => {
      const symbol = { healthy: "✓", unhealthy: "✗", ejected: "⏸" }[u.state] || "?";
      let text = `${symbol} ${u.state}`;
      if (u.state === "ejected" && u.ejected_until) text += ` until ${clock(u.ejected_until)}`;
      const li = el(
        "li",
        { "data-upstream": u.upstream },
        el("span", { class: "addr", text: u.upstream }),
        el("span", { class: "health", "data-state": u.state, text }),
      );
      if (u.in_flight) li.append(el("span", { class: "muted", text: `${u.in_flight} in flight` }));
      const check = u.last_check
        ? `last check ${u.last_check.ok ? "ok" : "failed"} ${ago(u.last_check.at)}` +
          (u.last_check.detail ? ` (${u.last_check.detail})` : "")
        : "no active health check";
      li.append(el("span", { class: "check", "data-at": u.last_check ? u.last_check.at : "", text: check }));
      return li;
    });
    list.replaceChildren(...items);
    if (!ups.length) list.append(el("li", { class: "muted", text: "no upstream configured" }));
  }

  function sparkPath(values, max) {
    const n = values.length;
    if (!n) return ["", ""];
    const step = 300 / Math.max(HISTORY - 1, 1);
    const x0 = 300 - (n - 1) * step;
    const pts = values.map((v, i) => `${(x0 + i * step).toFixed(1)},${(34 - (max ? (v / max) * 32 : 0)).toFixed(1)}`);
    const line = pts.join(" ");
    return [line, `${x0.toFixed(1)},36 ${line} 300,36`];
  }

  function drawSpark(svg, values, max) {
    const [line, area] = sparkPath(values, max);
    const a = document.createElementNS(SVG, "polygon");
    a.setAttribute("class", "area");
    a.setAttribute("points", area);
    const l = document.createElementNS(SVG, "polyline");
    l.setAttribute("class", "line");
    l.setAttribute("points", line);
    svg.replaceChildren(...(values.length ? [a, l] : []));
  }

  function renderSpark(color) {
    const card = cards[color];
    const s = model.series[color];
    const per = model.interval || 1;
    const rates = s.requests.map((n) => n / per);
    const peak = Math.max(0, ...rates);
    drawSpark(field(card, "spark-rate"), rates, peak);
    field(card, "rate-peak").textContent = peak ? `(peak ${rate(peak)})` : "";
    const ratios = s.requests.map((n, i) => (n ? s.errors[i] / n : 0));
    const worst = Math.max(0, ...ratios);
    drawSpark(field(card, "spark-errors"), worst ? ratios : [], Math.max(worst, 0.01));
    field(card, "error-peak").textContent = worst ? `(worst second ${pct(worst, 1)})` : "(no errors)";
  }

  function renderDrain(color) {
    const card = cards[color];
    const box = field(card, "drain");
    const drain = model.drains.find((d) => d.color === color);
    box.hidden = !drain;
    if (!drain) return;
    box.dataset.deadline = drain.deadline;
    const c = model.counters ? model.counters.colors[color] : null;
    const pool = model.state.pools[color];
    const inFlight = c ? c.in_flight : pool.in_flight;
    const streams = c ? c.streams : pool.streams;
    field(card, "drain-open").textContent = `${count(inFlight)} in flight, ${count(streams)} open streams`;
    const total = Date.parse(drain.deadline) - Date.parse(drain.started_at);
    const done = total > 0 ? (Date.now() + model.skew - Date.parse(drain.started_at)) / total : 1;
    field(card, "drain-progress").value = Math.min(1, Math.max(0, done));
    field(card, "drain-left").textContent = left(drain.deadline);
  }

  // Once a second between events: countdowns and "N s ago" move on their own.
  function tick() {
    if (!model.state) return;
    for (const color of COLORS) {
      const card = cards[color];
      if (!field(card, "drain").hidden) renderDrain(color);
    }
  }

  function target() {
    const st = model.state;
    if (st.active) return st.active === "blue" ? "green" : "blue";
    return st.weights.blue <= st.weights.green ? "blue" : "green";
  }

  function renderControls() {
    const st = model.state;
    const to = target();
    const flip = $("flip");
    flip.textContent = `Flip to ${to}`;
    flip.dataset.to = to;
    const from = COLORS.find((c) => c !== to);
    $("flip-hint").textContent = st.active
      ? `Every new request goes to ${to}; ${from} drains (open streams may finish until the drain timeout).`
      : `Ends the split: every new request goes to ${to}; ${from} drains.`;
    const slider = $("weights-slider");
    if (!slider.dataset.touched) {
      const total = st.weights.blue + st.weights.green;
      slider.value = String(total ? Math.round((st.weights.green / total) * 100) : 0);
      showSlider();
    }
  }

  function showSlider() {
    const green = Number($("weights-slider").value);
    $("w-blue").value = String(100 - green);
    $("w-green").value = String(green);
    $("w-blue").textContent = String(100 - green);
    $("w-green").textContent = String(green);
  }

  function rolloutKind(state) {
    if (state === "promoted") return "good";
    if (state === "rolled_back" || state === "aborted") return "bad";
    if (state === "paused" || state === "waiting") return state;
    return "live";
  }

  function renderRollout() {
    const r = model.rollout;
    $("rollout-none").hidden = !!r;
    $("rollout-body").hidden = !r;
    if (!r) return;
    $("rollout-route").replaceChildren(colorTag(r.from), " → ", colorTag(r.to));
    const badge = $("rollout-state");
    badge.textContent = r.state.replace("_", " ") + (r.rule ? ` (${r.rule})` : "");
    badge.dataset.kind = rolloutKind(r.state);
    const meta = [`${r.id}`, `by ${r.actor}`, `started ${stamp(r.created_at)}`];
    if (r.reason) meta.push(`“${r.reason}”`);
    if (r.paused_by) meta.push(`paused by ${r.paused_by}`);
    if (r.gates_left.length) meta.push(`waiting for gate ${r.gates_left[0]}`);
    $("rollout-meta").textContent = meta.join(" · ");
    $("rollout-steps").replaceChildren(
      ...r.steps.map((s) => {
        const label = `${s.weight}%` + (s.status === "current" && r.state === "baking" ? " baking" : "");
        return el("li", { "data-status": s.status, title: s.status, text: `${label} ${s.status}` });
      }),
    );
    const current = r.steps.find((s) => s.status === "current");
    $("rollout-progress").textContent = current && !["promoted", "rolled_back", "aborted"].includes(r.state)
      ? `Step ${current.index + 1} of ${r.steps.length} since ${clock(current.started_at)}: ` +
        `it stays at least ${duration(r.spec.step_pause)} and until ${count(r.spec.min_requests)} ` +
        `candidate requests` + (r.spec.bake ? `; then bakes ${duration(r.spec.bake)} at 100%.` : ".")
      : "";
    const evidence = model.counters && model.counters.rollout && model.counters.rollout.id === r.id
      ? model.counters.rollout.evidence
      : r.evidence;
    renderEvidence(r, evidence);
    const done = ["promoted", "rolled_back", "aborted"].includes(r.state);
    const allowed = {
      promote: !done,
      pause: !done && r.state !== "paused",
      resume: !done && r.state === "paused",
      abort: !done,
    };
    for (const button of document.querySelectorAll("[data-action]")) {
      button.disabled = !allowed[button.dataset.action];
    }
    $("decision-count").textContent = String(r.decisions.length);
    $("rollout-decisions").replaceChildren(
      ...r.decisions
        .slice(-50)
        .reverse()
        .map((d) => el("li", { text: `${clock(d.at)} · ${d.action} · ${d.reason}` })),
    );
  }

  function renderEvidence(r, ev) {
    const box = $("rollout-evidence");
    if (!ev) {
      box.replaceChildren(el("p", { class: "muted", text: "No evidence at this step yet." }));
      return;
    }
    const threshold = ev.threshold;
    const row = (label, color, c, judged) => {
      const over = judged && c.error_ratio_low > threshold;
      return el(
        "tr",
        {},
        el("th", { scope: "row" }, label, " (", colorTag(color), ")"),
        el("td", { text: count(c.requests) }),
        el("td", { text: count(c.errors) }),
        el("td", { class: over ? "over" : "", text: pct(c.error_ratio) + (over ? " over" : "") }),
        el("td", { text: `${pct(c.error_ratio_low)} – ${pct(c.error_ratio_high)}` }),
        el("td", { text: seconds(c.p99) }),
      );
    };
    const table = el(
      "table",
      {},
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          ...["This step", "Requests", "Errors", "Error ratio", "Bounds", "p99"].map((h) =>
            el("th", { scope: "col", text: h }),
          ),
        ),
      ),
      el("tbody", {}, row("candidate", r.to, ev.candidate, true), row("stable", r.from, ev.stable, false)),
    );
    const verdict = ev.proven
      ? "shown below the threshold"
      : ev.candidate.error_ratio_low > threshold
        ? "shown above the threshold"
        : "not shown either way yet";
    box.replaceChildren(
      el("div", { class: "table-wrap" }, table),
      el("p", {
        text: `Threshold ${pct(threshold)} (max_error_ratio): the candidate is ${verdict}. ` +
          `Bounds hold at ${pct(1 - ev.alpha, 3)} for this step.`,
      }),
    );
  }

  function renderEvents(events) {
    const rows = events
      .slice(-50)
      .reverse()
      .map((e) => {
        // A switch shows its weights (blue/green); any other kind of entry, its kind.
        const weights = el(
          "td",
          {},
          e.from_weights && e.to_weights
            ? `${e.from_weights.blue}/${e.from_weights.green} → ${e.to_weights.blue}/${e.to_weights.green}`
            : String(e.kind || "change"),
        );
        return el(
          "tr",
          {},
          el("td", { text: stamp(e.time) }),
          el("td", { text: String(e.version) }),
          weights,
          el("td", { class: "actor", text: e.actor }),
          el("td", { class: "reason", text: e.reason || "" }),
        );
      });
    $("events-body").replaceChildren(...rows);
    $("events-none").hidden = rows.length > 0;
  }

  // ------------------------------------------------------------------------------ actions

  let pending = null;

  function confirmAction(text) {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    $("confirm-reason").value = "";
    dialog.showModal();
    $("confirm-ok").focus();
    return new Promise((resolve) => {
      pending = resolve;
    });
  }

  function closeConfirm(ok) {
    const dialog = $("confirm");
    const reason = $("confirm-reason").value.trim();
    if (dialog.open) dialog.close();
    const resolve = pending;
    pending = null;
    if (resolve) resolve(ok ? { reason } : null);
  }

  function showResult(text) {
    $("refusal").hidden = true;
    const result = $("result");
    result.textContent = text;
    result.hidden = false;
  }

  function showRefusal(err) {
    $("result").hidden = true;
    $("refusal-status").textContent = err.status ? String(err.status) : "no answer";
    $("refusal-error").textContent = err.error;
    $("refusal-detail").replaceChildren(...err.detail.map((line) => el("li", { text: line })));
    $("refusal").hidden = false;
  }

  async function act(question, call, done) {
    const answer = await confirmAction(question);
    if (!answer) return;
    const body = answer.reason ? { reason: answer.reason } : {};
    try {
      const result = await call(body);
      showResult(done(result));
    } catch (err) {
      if (err instanceof Refusal) {
        if (err.status !== 401) showRefusal(err);
      } else {
        showRefusal(new Refusal(0, { error: String(err) }));
      }
    }
  }

  function ifMatch() {
    return { "If-Match": `"${model.state.version}"` };
  }

  function applyState(st) {
    // The change's own answer: shown at once, the stream confirms it.
    if (st && st.pools) {
      model.state = st;
      render();
    }
  }

  async function flip() {
    if (!model.state) return;
    const to = $("flip").dataset.to;
    const from = COLORS.find((c) => c !== to);
    await act(
      `Send every new request to ${to}? ${from} loses its weight and drains.`,
      async (body) => {
        const st = await api("POST", "/v1/flip", { to, ...body }, ifMatch());
        applyState(st);
        return st;
      },
      (st) => `Flipped: ${st.active || to} is live (version ${st.version}).`,
    );
  }

  async function applyWeights(event) {
    event.preventDefault();
    if (!model.state) return;
    const green = Number($("weights-slider").value);
    const blue = 100 - green;
    await act(
      `Set the weights to blue ${blue} / green ${green}?` +
        (blue === 0 || green === 0 ? ` ${blue === 0 ? "blue" : "green"} drains.` : ""),
      async (body) => {
        const st = await api("PUT", "/v1/weights", { blue, green, ...body }, ifMatch());
        delete $("weights-slider").dataset.touched;
        applyState(st);
        return st;
      },
      (st) => `Weights set: blue ${st.weights.blue} / green ${st.weights.green} (version ${st.version}).`,
    );
  }

  async function rolloutAction(action) {
    const r = model.rollout;
    if (!r) return;
    const questions = {
      promote: `Promote ${r.id}? ${r.to} gets 100% now, skipping the steps left and the bake.`,
      pause: `Pause ${r.id} at its step? The rules keep watching.`,
      resume: `Resume ${r.id}?`,
      abort: `Abort ${r.id}? Traffic goes back to ${r.from} at once; ${r.to} drains.`,
    };
    await act(
      questions[action],
      async (body) => {
        const view = await api("POST", `/v1/rollouts/current/${action}`, body);
        model.rollout = view;
        renderRollout();
        return view;
      },
      (view) => `Rollout ${view.id}: ${view.state.replace("_", " ")}.`,
    );
  }

  // ------------------------------------------------------------------------------ start

  function showFatal(err) {
    const box = $("fatal");
    box.textContent = `bgproxy did not answer as expected: ${err.error || err}` +
      (err.detail && err.detail.length ? ` (${err.detail.join("; ")})` : "");
    box.hidden = false;
  }

  async function start() {
    const st = await api("GET", "/v1/state"); // 401 here: askToken() has shown the form
    $("fatal").hidden = true;
    $("login").hidden = true;
    $("dash").hidden = false;
    $("signout").hidden = !token();
    model.state = st;
    render();
    loadEvents(st.version);
    loadFleet();
    stop();
    running = true;
    watchLoop(generation);
  }

  function wire() {
    buildCards();
    $("login-form").addEventListener("submit", useToken);
    $("signout").addEventListener("click", forgetToken);
    $("flip").addEventListener("click", flip);
    $("weights-form").addEventListener("submit", applyWeights);
    $("weights-slider").addEventListener("input", () => {
      $("weights-slider").dataset.touched = "1";
      showSlider();
    });
    for (const button of document.querySelectorAll("[data-action]")) {
      button.addEventListener("click", () => rolloutAction(button.dataset.action));
    }
    $("confirm-form").addEventListener("submit", (event) => {
      event.preventDefault();
      closeConfirm(true);
    });
    $("confirm-cancel").addEventListener("click", () => closeConfirm(false));
    $("confirm").addEventListener("cancel", () => closeConfirm(false));
    setInterval(tick, 1000);
    start().catch((err) => {
      if (err.status !== 401) showFatal(err);
    });
  }

  wire();
})();
