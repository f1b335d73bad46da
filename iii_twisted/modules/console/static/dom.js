// DOM helpers for the console. Every text from the engine or a worker goes into the
// page as a text node (textContent / createTextNode): nothing here parses HTML.

const SVG = "http://www.w3.org/2000/svg";

// h("tag.class", {attr: value, onclick: fn}, child, ...): children are nodes,
// strings (text nodes), numbers, arrays of those, or null (skipped).
export function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "value") {
      el.value = value;
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  clear(el);
  append(el, children);
  return el;
}

// A table: columns are [header, cell(row) -> child, className?].
export function table(columns, rows, options = {}) {
  const head = h("tr", null, columns.map(([title, , cls]) => h("th" + (cls ? "." + cls : ""), null, title)));
  const body = rows.map((row) => {
    const tr = h("tr", options.rowAttrs ? options.rowAttrs(row) : null,
      columns.map(([, cell, cls]) => h("td" + (cls ? "." + cls : ""), null, cell(row))));
    if (options.onRowClick) {
      tr.classList.add("clickable");
      tr.addEventListener("click", () => options.onRowClick(row));
    }
    if (options.selected && options.selected(row)) tr.classList.add("selected");
    return tr;
  });
  if (!rows.length) {
    body.push(h("tr", null, h("td.muted", { colspan: columns.length }, options.empty || "none")));
  }
  return h("table", options.attrs || null, h("thead", null, head), h("tbody", null, body));
}

export function badge(text, kind) {
  return h("span.badge" + (kind ? "." + String(kind).replace(/[^a-z_-]/gi, "") : ""), null, text);
}

export function card(label, value, attrs) {
  return h("div.card", attrs || null, h("div.label", null, label), h("div.value", null, value));
}

export function json(value, max = 2000) {
  let text;
  try { text = JSON.stringify(value, null, 2); } catch (e) { text = String(value); }
  if (text === undefined) text = "null";
  return text.length > max ? text.slice(0, max) + "…" : text;
}

export function ms(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return value.toFixed(2) + " ms";
  if (value < 1000) return value.toFixed(1) + " ms";
  return (value / 1000).toFixed(2) + " s";
}

export function num(value, digits = 0) {
  if (value === null || value === undefined) return "–";
  return Number(value).toFixed(digits);
}

export function pct(value) {
  if (value === null || value === undefined) return "–";
  return (value * 100).toFixed(1) + " %";
}

export function time(msSinceEpoch) {
  if (!msSinceEpoch) return "–";
  return new Date(msSinceEpoch).toLocaleString();
}

export function duration(msValue) {
  if (msValue === null || msValue === undefined) return "–";
  let rest = Math.floor(msValue / 1000);
  const d = Math.floor(rest / 86400); rest %= 86400;
  const hh = Math.floor(rest / 3600); rest %= 3600;
  const mm = Math.floor(rest / 60); const ss = rest % 60;
  return (d ? d + "d " : "") + (d || hh ? hh + "h " : "") + mm + "m " + ss + "s";
}

export function errorOf(part) {
  return part && typeof part === "object" && !Array.isArray(part) && part.error ? part.error : null;
}

export function errorNote(error) {
  const text = error.code === "function_not_found"
    ? "not available: the module that provides it is not loaded (" + error.message + ")"
    : error.code + ": " + error.message;
  return h("div.notice.error-text", { "data-error-code": error.code }, text);
}

const COLORS = ["#3557d6", "#1f8a4c", "#c2352b", "#b7791f", "#7b3fc4", "#1a8a9c", "#8a5a1f"];

// A line chart of series {name: [[t, value], ...]} over the same time axis.
export function lineChart(series, options = {}) {
  const width = 640, height = 160, left = 36, bottom = 18, top = 8;
  const names = Object.keys(series);
  const points = names.flatMap((n) => series[n]);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: "none", role: "img", "aria-label": options.label || "chart" });
  const legend = h("div.legend");
  if (!points.length) {
    return h("div", null, svg, h("div.notice", null, options.empty || "no samples yet"));
  }
  const t0 = Math.min(...points.map((p) => p[0]));
  const t1 = Math.max(...points.map((p) => p[0]), t0 + 1);
  const vmax = Math.max(1, ...points.map((p) => p[1]));
  const x = (t) => left + (width - left - 4) * (t - t0) / (t1 - t0);
  const y = (v) => top + (height - top - bottom) * (1 - v / vmax);
  svg.append(s("line", { class: "axis", x1: left, y1: y(0), x2: width - 4, y2: y(0) }));
  svg.append(s("line", { class: "axis", x1: left, y1: top, x2: left, y2: y(0) }));
  svg.append(s("text", { x: 2, y: top + 8 }, String(Math.round(vmax * 10) / 10)));
  svg.append(s("text", { x: 2, y: y(0) }, "0"));
  svg.append(s("text", { x: left, y: height - 4 }, new Date(t0).toLocaleTimeString()));
  svg.append(s("text", { x: width - 60, y: height - 4 }, new Date(t1).toLocaleTimeString()));
  names.forEach((name, i) => {
    const color = COLORS[i % COLORS.length];
    svg.append(s("polyline", { fill: "none", stroke: color, "stroke-width": 2,
      "vector-effect": "non-scaling-stroke",
      points: series[name].map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ") }));
    const swatch = h("i"); swatch.style.background = color;
    legend.append(h("span", null, swatch, name));
  });
  return h("div", null, svg, legend);
}
