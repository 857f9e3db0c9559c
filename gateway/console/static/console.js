// The console: one WebSocket to /console/events, the key as its first message, then one frame a
// second from the gateway's producer. Everything drawn here is what that frame says; the page
// keeps at most 900 points for the plots (the gateway's own ring), nothing else grows.
"use strict";
(() => {
  const { el } = tenebra;
  const POINTS = 900;
  const $ = (id) => document.getElementById(id);
  let points = [];  // [t, rate, p50, p99], oldest first
  let socket = null;
  let retry = null;
  let lastFrame = null;

  function showLogin(message) {
    $("board").hidden = true;
    $("logout").hidden = true;
    $("scope").textContent = "";
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    setStatus("", "");
    $("key").focus();
  }

  function setStatus(text, kind) {
    const status = $("status");
    status.textContent = text;
    status.className = "status " + kind;
  }

  function connect() {
    const key = tenebra.key.get("console");
    if (!key) return showLogin();
    clearTimeout(retry);
    setStatus("connecting", "");
    socket = new WebSocket(tenebra.socketURL("/console/events"));
    socket.onopen = () => socket.send(JSON.stringify({ key }));
    socket.onmessage = (event) => receive(JSON.parse(event.data));
    socket.onclose = (event) => {
      socket = null;
      if (event.code === 4001) {
        tenebra.key.forget("console");
        return showLogin("That key opens nothing here: an admin key or a tenant's API key.");
      }
      if (!tenebra.key.get("console")) return;
      setStatus(event.code === 4008 ? "too slow: reconnecting" : "disconnected: reconnecting", "down");
      retry = setTimeout(connect, 2000);
    };
  }

  function receive(message) {
    if (message.type === "hello") {
      $("login").hidden = true;
      $("board").hidden = false;
      $("logout").hidden = false;
      $("scope").textContent = message.scope === "admin" ? "admin: every tenant" : "tenant: " + message.scope;
      setStatus("live", "live");
    } else if (message.type === "history") {
      points = message.points.slice(-POINTS);
    } else if (message.type === "tick") {
      if (message.point) {
        const last = points[points.length - 1];
        if (!last || last[0] !== message.point[0]) points.push(message.point);
        if (points.length > POINTS) points.splice(0, points.length - POINTS);
      }
      lastFrame = message;
      render(message);
    }
  }

  // ------------------------------------------------------------------ plots (SVG)

  function plot(svg, series, options) {
    const width = svg.clientWidth || 600;
    const height = svg.clientHeight || 170;
    const left = 40, right = 8, top = 8, bottom = 18;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const now = points.length ? points[points.length - 1][0] : Date.now() / 1000;
    // the last 15 minutes at most; a gateway that started a minute ago is drawn over that minute
    const span = Math.min(POINTS, Math.max(60, points.length ? now - points[0][0] : 60));
    const start = now - span;
    let max = options.min;
    for (const p of points) for (const i of series) if (p[i] !== null && p[i] > max) max = p[i];
    max = nice(max * 1.1);
    const x = (t) => left + ((t - start) / span) * (width - left - right);
    const y = (v) => top + (1 - v / max) * (height - top - bottom);
    const ns = "http://www.w3.org/2000/svg";
    const make = (tag, attrs) => {
      const node = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      return node;
    };
    svg.replaceChildren();
    const grid = make("g", { class: "grid" });
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      grid.append(make("line", { x1: left, x2: width - right, y1: y(v), y2: y(v) }));
      const label = make("text", { x: left - 6, y: y(v) + 3, "text-anchor": "end" });
      label.textContent = options.format(v);
      grid.append(label);
    }
    const step = [10, 15, 30, 60, 120, 300].find((s) => span / s <= 6) || 300;
    for (let back = 0; back <= span; back += step) {
      const label = make("text", { x: x(now - back), y: height - 4, "text-anchor": back === 0 ? "end" : "middle" });
      label.textContent = back === 0 ? "now" : back < 60 ? `−${back} s` : `−${back / 60} min`;
      grid.append(label);
    }
    svg.append(grid);
    series.forEach((i, n) => {
      const shown = points.filter((p) => p[0] >= start);
      let d = "";
      shown.forEach((p, k) => {
        if (p[i] === null) return;
        // a second in which no task ended has no latency: the line bridges it where asked
        const before = options.bridge ? shown.slice(0, k).some((q) => q[i] !== null) : k > 0 && shown[k - 1][i] !== null;
        const joined = before;
        d += (joined ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[i]).toFixed(1);
        const after = options.bridge ? shown.slice(k + 1).some((q) => q[i] !== null) : k < shown.length - 1 && shown[k + 1][i] !== null;
        const alone = !joined && !after;
        if (alone) svg.append(make("circle", { cx: x(p[0]), cy: y(p[i]), r: 2.5, class: options.classes[n] + " dot" }));
      });
      if (options.area) {
        const runs = d.split("M").filter(Boolean);  // one filled area under each unbroken run
        for (const run of runs) {
          const xy = run.split("L").map((pair) => pair.split(" "));
          if (xy.length < 2) continue;
          svg.append(make("path", { d: `M${xy[0][0]} ${y(0)}L${run}L${xy[xy.length - 1][0]} ${y(0)}Z`, class: "area" }));
        }
      }
      svg.append(make("path", { d, class: options.classes[n] }));
    });
  }

  function nice(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  // ------------------------------------------------------------------ tables

  function table(node, head, rows, empty) {
    const header = el("tr", {}, head.map(([text, cls]) => el("th", { class: cls }, text)));
    const body = rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: head.length }, empty))];
    node.replaceChildren(el("thead", {}, header), el("tbody", {}, body));
  }

  function budgetBar(share) {  // width set through the CSSOM: the page's CSP allows no style attribute
    const fill = el("span");
    fill.style.width = (share * 100).toFixed(1) + "%";
    return el("div", { class: "bar" + (share >= 1 ? " over" : ""), title: Math.round(share * 100) + "% of the budget" }, fill);
  }

  const state = (s) => el("span", { class: "state " + s }, s);

  function render(frame) {
    const last = points[points.length - 1];
    $("rate-now").textContent = last ? `${last[1].toFixed(1)} now` : "";
    $("latency-now").textContent = last && last[2] !== null
      ? `p50 ${tenebra.seconds(last[2])} · p99 ${tenebra.seconds(last[3])}` : "";
    plot($("plot-rate"), [1], { min: 1, classes: ["rate"], area: true, format: (v) => v.toFixed(v < 10 ? 1 : 0) });
    plot($("plot-latency"), [2, 3], { min: 0.1, classes: ["p50", "p99"], bridge: true, format: (v) => v.toFixed(v < 1 ? 2 : 1) });

    const admin = frame.scope === "admin";
    table($("links"), admin
      ? [["link"], ["state"], ["session age", "num"], ["in flight", "num"], ["window", "num"], ["reconnects", "num"]]
      : [["link"], ["state"]],
    frame.links.map((l) => el("tr", {},
      el("td", {}, "#" + l.index + (l.adopted ? " (adopted)" : "")),
      el("td", {}, state(l.state)),
      admin ? [
        el("td", { class: "num" }, l.session_age === null ? "–" : tenebra.age(l.session_age)),
        el("td", { class: "num" }, l.in_flight + (l.outbox ? ` +${l.outbox} sending` : "")),
        el("td", { class: "num" }, `${l.window} / ${l.ceiling}`),
        el("td", { class: "num" }, l.reconnects),
      ] : [])), "no provider link");

    table($("tenants"), [["tenant"], ["connections", "num"], ["queued", "num"], ["in flight", "num"],
      ["tasks/s", "num"], ["images today", "num"], ["spend today", "num"], ["budget / day", "num"], [""]],
    frame.tenants.map((t) => {
      const share = t.budget ? Math.min(1, t.spend_today / t.budget) : 0;
      return el("tr", {},
        el("td", {}, t.tenant),
        el("td", { class: "num" }, t.connections),
        el("td", { class: "num" }, t.queued),
        el("td", { class: "num" }, t.in_flight),
        el("td", { class: "num" }, t.rate.toFixed(1)),
        el("td", { class: "num" }, t.images_today ?? "–"),
        el("td", { class: "num" }, tenebra.money(t.spend_today)),
        el("td", { class: "num" }, t.budget === null ? "none" : tenebra.money(t.budget)),
        el("td", {}, t.budget ? budgetBar(share) : ""));
    }), "no tenant");

    $("errors-scope").textContent = admin ? "every error item sent since start" : "this tenant's failed tasks";
    const errors = Object.entries(frame.errors).sort((a, b) => b[1] - a[1]);
    table($("errors"), [["code"], ["count", "num"]],
      errors.map(([code, n]) => el("tr", {}, el("td", { class: "mono" }, code), el("td", { class: "num" }, n))),
      "no error");

    $("tasks-note").textContent = `the last ${frame.tasks.length} to end` +
      (admin && frame.viewers !== null ? ` · ${frame.viewers} viewer${frame.viewers === 1 ? "" : "s"}` +
        (frame.dropped ? `, ${frame.dropped} dropped as too slow` : "") : "");
    table($("tasks"), [["ended"], ["taskUUID"], admin ? ["tenant"] : null, ["state"], ["latency", "num"],
      ["images", "num"], ["cost", "num"], ["deliveries (attempts)"], ["error"]].filter(Boolean),
    frame.tasks.map((t) => el("tr", {},
      el("td", {}, tenebra.clock(t.ended)),
      el("td", { class: "mono", title: t.taskUUID }, t.taskUUID.slice(0, 8) + "…"),
      admin ? el("td", {}, t.tenant) : null,
      el("td", {}, state(t.state)),
      el("td", { class: "num" }, tenebra.seconds(t.latency)),
      el("td", { class: "num" }, `${t.images}/${t.requested}`),
      el("td", { class: "num" }, tenebra.money(t.cost)),
      el("td", {}, t.deliveries.length ? t.deliveries.map((d) =>
        el("span", { class: "state " + d.state, title: d.status ? "HTTP " + d.status : "" }, `${d.kind} ${d.state} ×${d.attempts}`))
        : el("span", { class: "muted" }, "–")),
      el("td", { class: "mono" }, t.error || ""))), "no task has ended yet");
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    tenebra.key.set("console", $("key").value.trim());
    $("key").value = "";
    connect();
  });
  $("logout").addEventListener("click", () => {
    tenebra.key.forget("console");
    if (socket) socket.close();
    showLogin();
  });
  window.addEventListener("resize", () => lastFrame && render(lastFrame));
  connect();
})();
