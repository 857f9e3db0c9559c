// Shared by the console and the playground: small DOM helpers and where the key is kept.
// The key lives in sessionStorage only (this tab, until it closes); it is sent over the
// WebSocket as a message, never in a URL.
"use strict";

const tenebra = {
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  },
  socketURL(path) {
    return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
  },
  key: {
    get(name) { return sessionStorage.getItem("tenebra." + name) || ""; },
    set(name, value) { sessionStorage.setItem("tenebra." + name, value); },
    forget(name) { sessionStorage.removeItem("tenebra." + name); },
  },
  money(value) {
    if (value === null || value === undefined) return "–";
    return "$" + (value >= 100 ? value.toFixed(0) : value.toFixed(value < 1 ? 3 : 2));
  },
  seconds(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    if (value < 1) return Math.round(value * 1000) + " ms";
    if (value < 120) return value.toFixed(value < 10 ? 2 : 1) + " s";
    if (value < 7200) return Math.round(value / 60) + " min";
    return (value / 3600).toFixed(1) + " h";
  },
  age(seconds) {  // how long ago something began, in whole units
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
    return Math.round(seconds / 86400) + " d";
  },
  clock(epochSeconds) {
    return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
  },
  uuid() { // v4 from getRandomValues: crypto.randomUUID needs a secure context, plain http may not be one
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  },
};
