// The console's pages. Each is page(root, ctx) -> {update(data), failed(error)}: it
// builds its fixed parts (filters, forms) once, and redraws its live part on every
// push. ctx: {params, setParams(next), call(id, payload), confirm(text, detail)}.
import {
  h, replace, table, badge, card, json, ms, num, pct, time, duration, errorOf, errorNote,
  lineChart,
} from "./dom.js";

function livePage(root, title, draw, before, after) {
  root.append(h("h1", null, title));
  if (before) root.append(before);
  const live = h("div", { id: "live" }, h("div.notice", null, "loading…"));
  root.append(live);
  if (after) root.append(after);
  return {
    update(data) { replace(live, draw(data)); },
    failed(error) { replace(live, errorNote(error)); },
  };
}

function shown(count, total) {
  return total > count ? h("div.notice", null, "showing " + count + " of " + total + ": filter to see the rest") : null;
}

// A state or stream item: {key, value}, or whatever a custom stream function listed.
function itemKey(x) { return x && typeof x === "object" && "key" in x ? x.key : "–"; }
function itemValue(x) { return x && typeof x === "object" && "key" in x ? x.value : x; }

function part(value, draw) {
  const error = errorOf(value);
  return error ? errorNote(error) : draw(value);
}

function resultBox(answer) {
  const pre = h("pre.result." + (answer.ok ? "ok" : "error"), { "data-testid": "call-result" });
  pre.textContent = answer.ok ? json(answer.result, 20000)
    : (answer.error.code + ": " + answer.error.message);
  return pre;
}

function parseJson(text) {
  if (!text.trim()) return { ok: true, value: null };
  try { return { ok: true, value: JSON.parse(text) }; } catch (e) {
    return { ok: false, error: { code: "invalid_json", message: String(e.message) } };
  }
}

// -- overview ------------------------------------------------------------------------

function overview(root) {
  return livePage(root, "Overview", (d) => {
    const engine = d.engine || {};
    const calls = d.calls || {};
    const cards = h("div.cards", null,
      card("Engine version", errorOf(engine) ? "–" : engine.version, { "data-testid": "version" }),
      card("Uptime", errorOf(engine) ? "–" : duration(engine.uptime_ms)),
      card("Workers", errorOf(d.workers) ? "–" : d.workers.count, { "data-testid": "worker-count" }),
      card("Calls / s", errorOf(calls) ? "–" : num(calls.per_second, 1)),
      card("Error rate", errorOf(calls) ? "–" : pct(calls.error_rate)),
      card("p50", errorOf(calls) ? "–" : ms(calls.p50_ms)),
      card("p99", errorOf(calls) ? "–" : ms(calls.p99_ms)),
      card("Calls (total)", errorOf(calls) ? "–" : num(calls.total)));
    const modules = part(engine, (e) => table([
      ["Module", (m) => h("code", null, m.class)],
      ["Listening on", (m) => m.listeners.length ? m.listeners.join(", ") : h("span.muted", null, "–")],
    ], [{ class: "worker WebSocket", listeners: e.worker_listeners || [] }].concat(e.modules)));
    const queues = part(d.queues, (q) => {
      const series = {};
      for (const sample of q.series) {
        for (const [name, depth] of Object.entries(sample.depths || {})) {
          (series[name] = series[name] || []).push([sample.t, depth]);
        }
      }
      return lineChart(series, { label: "queue depths", empty: "no queues, or no samples yet" });
    });
    const rates = part(d.queues, (q) => {
      const series = { "calls/s": [], "errors/s": [] };
      const counted = q.series.filter((x) => x.calls !== null && x.calls !== undefined);
      for (let i = 1; i < counted.length; i++) {
        const seconds = (counted[i].t - counted[i - 1].t) / 1000;
        if (seconds <= 0) continue;
        series["calls/s"].push([counted[i].t, Math.max(0, counted[i].calls - counted[i - 1].calls) / seconds]);
        series["errors/s"].push([counted[i].t, Math.max(0, counted[i].errors - counted[i - 1].errors) / seconds]);
      }
      if (!series["calls/s"].length) return lineChart({}, { empty: "no samples yet" });
      return lineChart(series, { label: "calls per second" });
    });
    return [cards,
      errorOf(calls) ? errorNote(errorOf(calls)) : null,
      h("div.grid2", null,
        h("div", null, h("h2", null, "Calls per second"), h("div.panel", null, rates)),
        h("div", null, h("h2", null, "Queue depths"), h("div.panel", null, queues))),
      h("h2", null, "Modules and listeners"), modules];
  });
}

// -- workers -------------------------------------------------------------------------

function metricsSummary(metrics) {
  if (!metrics || typeof metrics !== "object") return h("span.muted", null, "–");
  const lines = [];
  for (const [key, value] of Object.entries(metrics)) {
    if (typeof value === "number") lines.push(key + " = " + (Number.isInteger(value) ? value : value.toFixed(3)));
  }
  return h("details", null, h("summary", null, lines.slice(0, 2).join(", ") || "metrics"),
    h("pre", null, json(metrics)));
}

function workers(root) {
  return livePage(root, "Workers", (d) => part(d, (w) => [shown(w.workers.length, w.total), table([
    ["Name", (x) => h("div", null, h("strong", null, x.name || "–"), h("div.muted.mono", null, x.id))],
    ["Runtime / SDK", (x) => [x.runtime || "–", " ", h("span.muted", null, x.version || "")]],
    ["Address", (x) => x.ip_address || "–"],
    ["Connected since", (x) => time(x.connected_at_ms)],
    ["Functions", (x) => h("details", null, h("summary", null, String(x.function_count)),
      x.functions.map((f) => h("div.mono", null, f)))],
    ["In flight", (x) => String(x.active_invocations), "num"],
    ["Latest metrics", (x) => metricsSummary(x.latest_metrics)],
    ["Status", (x) => badge(x.status, x.status)],
  ], w.workers, { empty: "no worker connected", attrs: { "data-testid": "workers" } })]));
}

// -- functions -----------------------------------------------------------------------

function functions(root, ctx) {
  const filter = h("input", { placeholder: "filter by id", size: 30 });
  const fid = h("input", { id: "call-function", placeholder: "function id", size: 40, list: "function-ids" });
  const payload = h("textarea", { id: "call-payload", placeholder: "{\"payload\": \"JSON\"}" });
  const datalist = h("datalist", { id: "function-ids" });
  const output = h("div", { id: "call-output" });
  const button = h("button", { type: "submit", id: "call-button" }, "Call");
  const form = h("form.panel", {
    onsubmit: async (event) => {
      event.preventDefault();
      const parsed = parseJson(payload.value);
      if (!parsed.ok) { replace(output, resultBox(parsed)); return; }
      button.disabled = true;
      replace(output, h("div.notice", null, "calling…"));
      try {
        replace(output, resultBox(await ctx.call(fid.value.trim(), parsed.value)));
      } finally { button.disabled = false; }
    },
  }, h("h2", null, "Call a function"),
  h("div.inline", null, h("label", null, "Function", fid)),
  h("label", null, "Payload (JSON)", payload), datalist, h("p", null, button), output);
  filter.value = ctx.params.filter || "";
  let typing = null;
  filter.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => ctx.setParams({ filter: filter.value.trim() }), 300);
  });
  const view = livePage(root, "Functions", draw, h("div", null, form,
    h("form.inline", { onsubmit: (e) => e.preventDefault() }, h("label", null, "Filter", filter))));
  function draw(d) {
    return part(d, (x) => {
      replace(datalist, x.functions.map((f) => h("option", { value: f.function_id })));
      const rows = x.functions;
      return [
        shown(rows.length, x.total),
        x.stats_error ? errorNote(x.stats_error) : null,
        table([
          ["Function", (f) => h("div", null, h("code", null, f.function_id),
            f.description ? h("div.muted", null, f.description) : null)],
          ["Host", (f) => [badge(f.host || "?", f.host === "worker" ? "active" : null),
            f.worker_id ? h("div.muted.nowrap", { title: f.worker_id }, f.worker_name || f.worker_id.slice(0, 8)) : null]],
          ["Triggers", (f) => f.triggers.map((t) => badge(t.trigger_type))],
          ["Calls", (f) => String(f.calls), "num"],
          ["Errors", (f) => f.errors ? h("span.error-text", null, String(f.errors)) : "0", "num"],
          ["p50", (f) => ms(f.p50_ms), "num"],
          ["p99", (f) => ms(f.p99_ms), "num"],
          ["", (f) => h("button.small.secondary", { onclick: () => {
            fid.value = f.function_id; payload.focus();
          } }, "Call…")],
        ], rows, { empty: "no function", attrs: { "data-testid": "functions" },
          rowAttrs: (f) => ({ "data-function-id": f.function_id }) }),
      ];
    });
  }
  return view;
}

// -- triggers ------------------------------------------------------------------------

function triggers(root) {
  return livePage(root, "Triggers", (d) => {
    const types = errorOf(d.trigger_types) ? [] : d.trigger_types.trigger_types;
    if (errorOf(d.triggers)) return errorNote(errorOf(d.triggers));
    const byType = {};
    for (const t of d.triggers.triggers) (byType[t.trigger_type] = byType[t.trigger_type] || []).push(t);
    const names = Array.from(new Set(types.map((t) => t.id).concat(Object.keys(byType)))).sort();
    const described = Object.fromEntries(types.map((t) => [t.id, t.description]));
    const empty = names.filter((name) => !(byType[name] || []).length);
    const sections = names.filter((name) => (byType[name] || []).length).map((name) => h("div.panel", null,
      h("h3", null, h("code", null, name), " ",
        h("span.muted", null, described[name] || ""), " ", badge(String((byType[name] || []).length))),
      (byType[name] || []).length ? table([
        ["Trigger", (t) => h("code", null, t.id)],
        ["Function", (t) => h("code", null, t.function_id)],
        ["Config", (t) => h("pre", null, json(t.config, 400))],
        ["Status", (t) => [badge(t.status, t.status), t.error ? h("div.error-text", null, t.error.message) : null]],
      ], byType[name]) : null));
    // Refused by a module (gone from the registry) or failed by a worker provider.
    const refused = (d.triggers.refused || []).concat(
      d.triggers.triggers.filter((t) => t.status === "failed"));
    const pending = d.triggers.triggers.filter((t) => t.status === "pending");
    return [
      h("h2", null, "Pending"),
      table([
        ["Trigger", (t) => h("code", null, t.id)],
        ["Type", (t) => h("code", null, t.trigger_type)],
        ["Function", (t) => h("code", null, t.function_id)],
        ["Why", (t) => h("span.muted", null, described[t.trigger_type] === undefined
          ? "no provider registered this trigger type (yet)" : "waiting for its provider")],
      ], pending, { empty: "no trigger waiting", attrs: { "data-testid": "pending-triggers" } }),
      h("h2", null, "Refused"),
      table([
        ["When", (t) => time(t.refused_at_ms)],
        ["Trigger", (t) => h("code", null, t.id)],
        ["Type", (t) => h("code", null, t.trigger_type)],
        ["Function", (t) => h("code", null, t.function_id)],
        ["Reason", (t) => h("span.error-text", null, t.error.code + ": " + t.error.message)],
      ], refused.slice().reverse(), { empty: "no trigger refused", attrs: { "data-testid": "refused-triggers" } }),
      h("h2", null, "By type"), sections,
      empty.length ? h("p.muted", null, "Types with no trigger: ",
        empty.map((name) => h("span", { title: described[name] || "" }, badge(name)))) : null,
    ];
  });
}

// -- traces --------------------------------------------------------------------------

function spanMs(span) {
  return (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6;
}

function waterfall(roots) {
  const rows = [];
  const walk = (node, depth) => { rows.push([node, depth]); (node.children || []).forEach((c) => walk(c, depth + 1)); };
  roots.forEach((r) => walk(r, 0));
  if (!rows.length) return h("div.notice", null, "no spans stored for this trace");
  const start = Math.min(...rows.map(([s]) => s.start_time_unix_nano));
  const end = Math.max(...rows.map(([s]) => s.end_time_unix_nano));
  const total = Math.max(end - start, 1);
  return h("div.waterfall.panel", { "data-testid": "waterfall" }, rows.map(([span, depth]) => {
    const bar = h("div.bar" + (span.status === "error" ? ".error" : ""));
    bar.style.left = (100 * (span.start_time_unix_nano - start) / total).toFixed(2) + "%";
    bar.style.width = (100 * (span.end_time_unix_nano - span.start_time_unix_nano) / total).toFixed(2) + "%";
    const name = h("div.name", { title: span.name }, span.name);
    name.style.paddingLeft = (depth * 14) + "px";
    return h("div.row", null, name, h("div.track", null, bar), h("div.muted.num", null, ms(spanMs(span))),
      span.status === "error"
        ? h("div.span-error.error-text", null, span.status_description || "error") : null);
  }));
}

function traces(root, ctx) {
  const params = ctx.params;
  const fn = h("input", { name: "function", placeholder: "function / span name", value: params.function || "" });
  const status = h("select", { name: "status" }, ["", "ok", "error", "unset"].map((v) =>
    h("option", { value: v }, v || "any")));
  status.value = params.status || "";
  const minMs = h("input", { name: "min_duration_ms", type: "number", min: 0, placeholder: "ms", value: params.min_duration_ms || "" });
  const apply = () => ctx.setParams(Object.assign({}, ctx.params, {
    function: fn.value.trim(), status: status.value,
    min_duration_ms: minMs.value === "" ? null : Number(minMs.value),
  }));
  const filters = h("form.inline", { onsubmit: (e) => { e.preventDefault(); apply(); } },
    h("label", null, "Function", fn), h("label", null, "Status", status),
    h("label", null, "Min duration", minMs), h("button", { type: "submit" }, "Filter"));
  return livePage(root, "Traces", (d) => {
    const list = part(d.list, (l) => table([
      ["Started", (sp) => time(sp.start_time_unix_nano / 1e6)],
      ["Name", (sp) => h("code", null, sp.name)],
      ["Service", (sp) => sp.service_name || "–"],
      ["Duration", (sp) => ms(spanMs(sp)), "num"],
      ["Status", (sp) => badge(sp.status, sp.status)],
      ["Trace", (sp) => h("span.mono.muted", null, sp.trace_id.slice(0, 12))],
    ], l.spans, {
      empty: "no trace matches", attrs: { "data-testid": "traces" },
      rowAttrs: (sp) => ({ "data-trace-id": sp.trace_id, "data-status": sp.status }),
      selected: (sp) => sp.trace_id === ctx.params.trace_id,
      onRowClick: (sp) => ctx.setParams(Object.assign({}, ctx.params, { trace_id: sp.trace_id })),
    }));
    const tree = d.tree ? [h("h2", null, "Trace ", h("span.mono", null, ctx.params.trace_id || "")),
      part(d.tree, (t) => waterfall(t.roots))] : [h("div.notice", null, "Pick a trace to see its spans.")];
    return [tree, h("h2", null, "Recent traces"), list];
  }, filters);
}

// -- logs ----------------------------------------------------------------------------

const LEVELS = [["", "any"], ["5", "debug"], ["9", "info"], ["13", "warn"], ["17", "error"]];

function logLevel(entry) {
  return entry.severity_text || String(entry.severity_number || "");
}

function logs(root, ctx) {
  const params = ctx.params;
  const level = h("select", { name: "severity_min" }, LEVELS.map(([v, t]) => h("option", { value: v }, t)));
  level.value = params.severity_min ? String(params.severity_min) : "";
  const text = h("input", { name: "text", placeholder: "text", value: params.text || "" });
  const filters = h("form.inline", { onsubmit: (e) => {
    e.preventDefault();
    ctx.setParams({ severity_min: level.value ? Number(level.value) : null, text: text.value });
  } }, h("label", null, "Level at least", level), h("label", null, "Text", text),
  h("button", { type: "submit" }, "Filter"));
  return livePage(root, "Logs", (d) => part(d, (l) => table([
    ["Time", (x) => time((x.timestamp_unix_nano || x.observed_timestamp_unix_nano || 0) / 1e6)],
    ["Level", (x) => badge(logLevel(x), (x.severity_number || 0) >= 17 ? "error" : null)],
    ["Message", (x) => h("pre", null, typeof x.body === "string" ? x.body : json(x.body, 1000))],
    ["Service", (x) => x.service_name || "–"],
    ["Trace", (x) => h("span.mono.muted", null, (x.trace_id || "").slice(0, 12))],
  ], l.logs, { empty: "no log matches", attrs: { "data-testid": "logs" } })), filters);
}

// -- queues --------------------------------------------------------------------------

function queues(root, ctx) {
  const output = h("div", { id: "queue-output" });
  async function act(functionId, payload, question, detail) {
    if (question && !(await ctx.confirm(question, detail))) return;
    replace(output, resultBox(await ctx.call(functionId, payload)));
  }
  return livePage(root, "Queues", (d) => part(d, (q) => {
    const dlqs = q.queues.filter((x) => x.dlq_depth).map((x) => h("div.panel", { "data-dlq": x.name },
      h("h3", null, "Dead letters of ", h("code", null, x.name), " ", badge(String(x.dlq_depth), "error"), " ",
        h("button.small", { onclick: () => act("iii::queue::redrive", { queue: x.name }) }, "Redrive all"), " ",
        h("button.small.danger", { onclick: () => act("iii::queue::discard", { queue: x.name },
          "Discard every dead-lettered message of " + x.name + "?") }, "Discard all")),
      part(x.dlq, (messages) => table([
        ["Failed at", (m) => time(m.failed_at * 1000)], // seconds, as the reference
        ["Message", (m) => h("span.mono", null, m.id)],
        ["Error", (m) => h("span.error-text", { "data-testid": "dlq-error" }, typeof m.error === "string" ? m.error : json(m.error))],
        ["Retries", (m) => String(m.retries), "num"],
        ["Payload", (m) => h("pre", null, json(m.payload, 300))],
        ["", (m) => [
          h("button.small", { onclick: () => act("iii::queue::redrive_message", { queue: x.name, message_id: m.id }) }, "Redrive"), " ",
          h("button.small.danger", { onclick: () => act("iii::queue::discard_message", { queue: x.name, message_id: m.id },
            "Discard this message?", json(m.payload, 500)) }, "Discard")]],
      ], messages, { rowAttrs: (m) => ({ "data-message-id": m.id }) }))));
    return [table([
      ["Queue", (x) => h("code", null, x.name)],
      ["Type", (x) => x.broker_type],
      ["Depth", (x) => String(x.depth), "num"],
      ["In flight", (x) => String(x.in_flight), "num"],
      ["DLQ", (x) => x.dlq_depth ? badge(String(x.dlq_depth), "error") : "0", "num"],
      ["Consumers", (x) => String(x.consumers), "num"],
    ], q.queues, { empty: "no queue", attrs: { "data-testid": "queues" },
      rowAttrs: (x) => ({ "data-queue": x.name }) }),
    output, dlqs.length ? [h("h2", null, "Dead-letter queues"), dlqs] : h("div.notice", null, "No dead-lettered message.")];
  }));
}

// -- state and streams ---------------------------------------------------------------

function editor(ctx, fields, save, remove) {
  // fields: [[name, label]]; the last is the JSON value.
  const inputs = fields.map(([name]) => name === "value"
    ? h("textarea", { name, placeholder: "JSON value" }) : h("input", { name, size: 24 }));
  const output = h("div");
  const form = h("form.panel", { onsubmit: async (event) => {
    event.preventDefault();
    const values = Object.fromEntries(fields.map(([name], i) => [name, inputs[i].value]));
    const parsed = parseJson(values.value);
    if (!parsed.ok) { replace(output, resultBox(parsed)); return; }
    const request = save(values, parsed.value);
    if (!(await ctx.confirm("Write this value?", json(request.payload, 1000)))) return;
    replace(output, resultBox(await ctx.call(request.function_id, request.payload)));
  } }, h("h2", null, "Edit"),
  h("div.inline", null, fields.slice(0, -1).map(([, label], i) => h("label", null, label, inputs[i]))),
  h("label", null, fields[fields.length - 1][1], inputs[inputs.length - 1]),
  h("p", null, h("button", { type: "submit" }, "Save…")), output);
  return {
    form,
    fill(values) {
      fields.forEach(([name], i) => { if (name in values) inputs[i].value = values[name]; });
    },
    async remove(request, question) {
      if (!(await ctx.confirm(question, json(request.payload, 1000)))) return;
      replace(output, resultBox(await ctx.call(request.function_id, request.payload)));
    },
  };
}

function state(root, ctx) {
  const edit = editor(ctx, [["scope", "Scope"], ["key", "Key"], ["value", "Value (JSON)"]],
    (v, value) => ({ function_id: "state::set", payload: { scope: v.scope, key: v.key, value } }));
  return livePage(root, "State", (d) => [
    h("h2", null, "Scopes"),
    part(d.groups, (g) => g.groups.length ? h("div.list", null, g.groups.map((name) =>
      h("a" + (name === d.scope ? ".selected" : ""), { onclick: () => {
        ctx.setParams({ scope: name }); edit.fill({ scope: name });
      } }, name))) : h("div.notice", null, "no scope holds a value")),
    d.scope ? [h("h2", null, "Scope ", h("code", null, d.scope)), part(d.items, (page) => [
      shown(page.items.length, page.total), table([
        ["Key", (x) => h("code", null, x.key)],
        ["Value", (x) => h("pre", null, json(x.value, 1000))],
        ["", (x) => [h("button.small.secondary", { onclick: () => edit.fill(
          { scope: d.scope, key: x.key, value: json(x.value, 1e9) }) }, "Edit"), " ",
        h("button.small.danger", { onclick: () => edit.remove(
          { function_id: "state::delete", payload: { scope: d.scope, key: x.key } },
          "Delete " + x.key + " from " + d.scope + "?") }, "Delete")]],
      ], page.items, { attrs: { "data-testid": "state-items" } })])] : null,
  ], null, edit.form);
}

function streams(root, ctx) {
  const edit = editor(ctx, [["stream_name", "Stream"], ["group_id", "Group"], ["item_id", "Item"],
    ["value", "Data (JSON)"]], (v, value) => ({ function_id: "stream::set",
    payload: { stream_name: v.stream_name, group_id: v.group_id, item_id: v.item_id, data: value } }));
  return livePage(root, "Streams", (d) => [
    h("h2", null, "Streams and groups"),
    part(d.streams, (all) => all.stream.length ? table([
      ["Stream", (x) => h("code", null, x.id)],
      ["Groups", (x) => h("div.list", null, x.groups.map((g) => h(
        "a" + (x.id === d.stream && g === d.group ? ".selected" : ""),
        { onclick: () => { ctx.setParams({ stream: x.id, group: g }); edit.fill({ stream_name: x.id, group_id: g }); } }, g)))],
    ], all.stream) : h("div.notice", null, "no stream holds an item")),
    d.stream ? [h("h2", null, "Items of ", h("code", null, d.stream + " / " + d.group)),
      part(d.items, (page) => [shown(page.items.length, page.total), table([
        ["Item", (x) => h("code", null, itemKey(x))],
        ["Data", (x) => h("pre", null, json(itemValue(x), 1000))],
        ["", (x) => [h("button.small.secondary", { onclick: () => edit.fill(
          { stream_name: d.stream, group_id: d.group, item_id: itemKey(x), value: json(itemValue(x), 1e9) }) }, "Edit"), " ",
        h("button.small.danger", { onclick: () => edit.remove({ function_id: "stream::delete",
          payload: { stream_name: d.stream, group_id: d.group, item_id: itemKey(x) } },
        "Delete item " + itemKey(x) + "?") }, "Delete")]],
      ], page.items)])] : null,
  ], null, edit.form);
}

export const PAGES = { overview, workers, functions, triggers, traces, logs, queues, state, streams };
