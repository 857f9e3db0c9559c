// The playground: a Runware client in plain JS. It speaks the public protocol over the gateway's
// /v1 WebSocket (authentication, then an imageInference task, results streamed one per frame),
// nothing private. The sizes, formats and ranges come from the gateway's catalogue
// (/console/catalogue.json), never from a list of its own.
"use strict";
(() => {
  const { el } = tenebra;
  const $ = (id) => document.getElementById(id);
  let catalogue = null;
  let socket = null;
  let socketKey = null;
  let ready = null;  // a promise of an authenticated socket
  let current = null;  // the task in progress: {uuid, wanted, got, started, cost}

  function setStatus(text, kind) {
    $("status").textContent = text;
    $("status").className = "status " + (kind || "");
  }

  // ------------------------------------------------------------------ the catalogue

  async function load() {
    const response = await fetch("/console/catalogue.json");
    catalogue = await response.json();
    const models = $("model");
    models.replaceChildren(...catalogue.models.map((m) => el("option", { value: m.air }, m.air)));
    models.addEventListener("change", fillModel);
    fillModel();
    const [low, high] = catalogue.numberResults;
    Object.assign($("number"), { min: low, max: high });
    const [qlow, qhigh] = catalogue.outputQuality;
    Object.assign($("quality"), { min: qlow, max: qhigh });
    $("key").value = tenebra.key.get("playground");
  }

  function model() {
    return catalogue.models.find((m) => m.air === $("model").value) || catalogue.models[0];
  }

  function fillModel() {
    const m = model();
    const tiers = {};
    for (const size of m.sizes) (tiers[size.tier] ||= []).push(size);
    const groups = Object.entries(tiers).map(([tier, sizes]) => el("optgroup", { label: `${tier} · $${sizes[0].price} per image` },
      sizes.map((s) => el("option", { value: s.label, selected: s.label === m.default_size }, `${s.label} (${s.ratio})`))));
    $("size").replaceChildren(...groups, el("option", { value: "custom" }, "custom…"));
    $("format").replaceChildren(...m.output_formats.map((f) => el("option", { value: f }, f)));
    $("type").replaceChildren(...m.output_types.map((t) => el("option", { value: t }, t)));
  }

  $("size").addEventListener("change", () => { $("custom").hidden = $("size").value !== "custom"; });

  // ------------------------------------------------------------------ the protocol

  function connect(key) {
    if (socket && socketKey === key && socket.readyState <= WebSocket.OPEN) return ready;
    if (socket) socket.close();
    socketKey = key;
    socket = new WebSocket(tenebra.socketURL("/v1"));
    const opened = socket;
    ready = new Promise((resolve, reject) => {
      opened.onopen = () => opened.send(JSON.stringify([{ taskType: "authentication", apiKey: key }]));
      opened.onmessage = (event) => {
        const frame = JSON.parse(event.data);
        const authError = (frame.errors || []).find((e) => e.taskType === "authentication" || e.parameter === "apiKey");
        if (authError) return reject(authError);
        if ((frame.data || []).some((d) => d.taskType === "authentication")) {
          setStatus("connected", "live");
          opened.onmessage = (later) => receive(JSON.parse(later.data));
          resolve(opened);
        }
      };
      opened.onclose = (event) => {
        if (socket === opened) { socket = null; setStatus("disconnected", "down"); }
        reject({ message: `The connection closed (${event.code}${event.reason ? ": " + event.reason : ""}).` });
        if (current) finish({ message: `The connection closed before the task ended (${event.code}).` });
      };
    });
    return ready;
  }

  function receive(frame) {
    if (!current) return;
    for (const item of frame.data || []) {
      if (item.taskUUID !== current.uuid || item.taskType !== "imageInference") continue;
      showImage(item);
    }
    for (const error of frame.errors || []) {
      if (error.taskUUID && error.taskUUID !== current.uuid) continue;
      finish(error);
    }
  }

  // ------------------------------------------------------------------ the form

  function clearErrors() {
    for (const field of document.querySelectorAll(".field")) {
      field.classList.remove("invalid");
      field.querySelector(".error").textContent = "";
    }
    $("form-error").textContent = "";
  }

  function showError(error) {
    // the error names its parameter(s): shown on the field that sets it
    const names = [].concat(error.parameter || []);
    let text = error.message || error.code;
    if (error.allowedValues) text += ` Allowed: ${error.allowedValues.join(", ")}.`;
    let shown = false;
    for (const name of names) {
      const field = document.querySelector(`.field[data-params~="${CSS.escape(name)}"]`);
      if (!field || field.classList.contains("invalid")) { shown = shown || Boolean(field); continue; }
      field.classList.add("invalid");
      field.querySelector(".error").textContent = text;
      shown = true;
    }
    if (!shown) $("form-error").textContent = (error.code ? error.code + ": " : "") + text;
  }

  function size() {
    if ($("size").value !== "custom") return $("size").value.split("x").map(Number);
    return [Number($("width").value), Number($("height").value)];
  }

  async function send(event) {
    event.preventDefault();
    if (current) return;
    clearErrors();
    const key = $("key").value.trim();
    tenebra.key.set("playground", key);
    const [width, height] = size();
    const task = {
      taskType: "imageInference",
      taskUUID: tenebra.uuid(),
      model: $("model").value,
      positivePrompt: $("prompt").value,
      width, height,
      numberResults: Number($("number").value),
      outputFormat: $("format").value,
      outputQuality: Number($("quality").value),
      outputType: $("type").value,
      deliveryMethod: "sync",
      includeCost: true,
    };
    current = { uuid: task.taskUUID, wanted: task.numberResults, got: 0, started: performance.now(), cost: 0, format: task.outputFormat };
    $("send").disabled = true;
    $("summary").textContent = "sending…";
    $("results").replaceChildren();
    let opened;
    try {
      opened = await connect(key);
    } catch (error) {
      return finish(error.code ? { ...error, parameter: error.parameter || "apiKey" } : error);
    }
    opened.send(JSON.stringify([task]));
    $("summary").textContent = "waiting for the first image…";
    placeholders(task.numberResults);
  }

  function placeholders(count) {
    for (let i = 0; i < Math.min(count, 20); i++) $("results").append(el("figure", { class: "image waiting" }, "waiting…"));
  }

  function showImage(item) {
    current.got += 1;
    const seconds = (performance.now() - current.started) / 1000;
    if (item.cost) current.cost += item.cost;
    const mime = { JPG: "jpeg", PNG: "png", WEBP: "webp" }[current.format] || "jpeg";
    const src = item.imageURL || item.imageDataURI || (item.imageBase64Data ? `data:image/${mime};base64,${item.imageBase64Data}` : "");
    const figure = el("figure", { class: "image", "data-image-uuid": item.imageUUID },
      el("img", { src, alt: "result " + current.got }),
      el("figcaption", {}, el("span", {}, "#" + current.got + " · ", el("b", {}, seconds.toFixed(2) + " s")),
        el("span", {}, item.cost === undefined ? "" : tenebra.money(item.cost))));
    const waiting = $("results").querySelector("figure.waiting");
    if (waiting) waiting.replaceWith(figure); else $("results").append(figure);
    $("summary").textContent = `${current.got} of ${current.wanted} · ${seconds.toFixed(2)} s`;
    if (current.got >= current.wanted) finish(null);
  }

  function finish(error) {
    if (!current) return;
    const seconds = (performance.now() - current.started) / 1000;
    for (const waiting of $("results").querySelectorAll("figure.waiting")) waiting.remove();
    if (error) {
      showError(error);
      $("summary").textContent = current.got ? `${current.got} of ${current.wanted}, then an error` : "";
    } else {
      $("summary").textContent = `${current.got} image${current.got === 1 ? "" : "s"} in ${seconds.toFixed(2)} s · cost ${tenebra.money(current.cost)}`;
    }
    if (!$("results").children.length) $("results").append(el("div", { class: "empty" }, "No image."));
    current = null;
    $("send").disabled = false;
  }

  $("form").addEventListener("submit", send);
  load().catch((error) => { $("form-error").textContent = "The catalogue did not load: " + error; });
})();
