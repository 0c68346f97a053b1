"use strict";
// Live view of router_stats.jsonl: records arrive over /ws and every control change redraws from them (plain SVG).

const SVG_NS = "http://www.w3.org/2000/svg";
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
// matrices: the last answer of /api/layers/{layer}/matrices and the key it answers; resets counts restarted files.
// alarms: what RoutingAlarms fired (alarms.jsonl), in order.
const state = { records: [], alarms: [], layer: 0, resets: 0, matrices: null, fetching: false };
const $ = (id) => document.getElementById(id);

function el(parent, tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  parent.appendChild(node);
  return node;
}

function colour(v) {
  const x = Math.max(0, Math.min(1, v)) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const mix = VIRIDIS[i].map((c, k) => Math.round(c + (VIRIDIS[i + 1][k] - c) * (x - i)));
  return `rgb(${mix.join(",")})`;
}

function fmt(v) {
  return v === null || v === undefined ? "-" : Number.isInteger(v) ? String(v) : v.toFixed(3);
}

// Rows x columns of values, coloured against the largest; every cell carries its value and hover text. A null value
// (undefined there) is a grey cell.
function heatmap(svg, rows, rowLabels, tip, selectedRow, onRowClick) {
  showNote(svg, null);
  svg.replaceChildren();
  const width = 900, left = 80, top = 4, bottom = 18;
  const cols = rows.length ? rows[0].length : 0;
  const cellW = (width - left - 8) / Math.max(cols, 1);
  const cellH = Math.max(3, Math.min(24, 320 / Math.max(rows.length, 1)));
  const height = top + rows.length * cellH + bottom;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const max = rows.flat().reduce((a, b) => Math.max(a, b ?? 0), 1e-12);  // no spread: long runs have many cells
  const labelEvery = Math.ceil(rows.length / 16);  // keep row labels readable when there are many steps
  rows.forEach((row, r) => {
    if (r % labelEvery === 0) {
      const y = top + (r + 0.5) * cellH + 4;
      el(svg, "text", { x: left - 4, y, "text-anchor": "end", class: "axis" }, rowLabels[r]);
    }
    row.forEach((v, c) => {
      const cell = el(svg, "rect", {
        x: left + c * cellW, y: top + r * cellH, width: Math.max(cellW - 1, 1), height: Math.max(cellH - 1, 1),
        fill: v === null ? "#ddd" : colour(v / max), "data-value": v === null ? "" : v, "data-tip": tip(r, c, v),
      });
      if (onRowClick) cell.addEventListener("click", () => onRowClick(r));
    });
  });
  for (let c = 0; c < cols; c++) {
    el(svg, "text", { x: left + (c + 0.5) * cellW, y: height - 4, "text-anchor": "middle", class: "axis" }, `e${c}`);
  }
  if (selectedRow !== null) {
    const y = top + selectedRow * cellH - 1;
    el(svg, "rect", { class: "selected", x: left - 1, y, width: cols * cellW + 1, height: cellH + 1 });
  }
}

// One polyline per series against the step; every point carries its step, value and hover text.
function lines(svg, steps, series, label) {
  showNote(svg, null);
  svg.replaceChildren();
  const width = 440, height = 220, left = 48, right = 10, top = 22, bottom = 22;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const values = series.flatMap((s) => s.values).filter((v) => v !== null);
  if (!values.length) {
    el(svg, "text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis" }, "no data");
    return;
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const first = steps[0], last = steps[steps.length - 1] > first ? steps[steps.length - 1] : first + 1;
  const x = (s) => left + ((s - first) / (last - first)) * (width - left - right);
  const y = (v) => top + ((hi - v) / (hi - lo)) * (height - top - bottom);
  el(svg, "text", { x: left - 4, y: y(hi) + 4, "text-anchor": "end", class: "axis" }, fmt(hi));
  el(svg, "text", { x: left - 4, y: y(lo) + 4, "text-anchor": "end", class: "axis" }, fmt(lo));
  el(svg, "text", { x: x(first), y: height - 6, class: "axis" }, `step ${steps[0]}`);
  const lastLabel = `step ${steps[steps.length - 1]}`;
  el(svg, "text", { x: width - right, y: height - 6, "text-anchor": "end", class: "axis" }, lastLabel);
  series.forEach((s, k) => {
    const points = steps.map((step, i) => [step, s.values[i]]).filter((p) => p[1] !== null);
    const path = points.map(([a, b]) => `${x(a)},${y(b)}`).join(" ");
    el(svg, "polyline", { points: path, fill: "none", stroke: s.colour });
    el(svg, "text", { x: left + 8 + 110 * k, y: 14, fill: s.colour, class: "axis" }, `${label} ${s.name}`);
    for (const [step, v] of points) {
      el(svg, "circle", {
        cx: x(step), cy: y(v), r: 3, fill: s.colour, "data-step": step, "data-value": v,
        "data-tip": `${label} ${s.name}, step ${step}: ${fmt(v)}`,
      });
    }
  });
}

// A short sentence in place of a chart that has nothing to show (the .note after the svg); null shows the chart.
function showNote(svg, text) {
  const note = svg.nextElementSibling;
  if (!note || !note.classList.contains("note")) return;
  note.textContent = text || "";
  note.hidden = !text;
  svg.style.display = text ? "none" : "";
  if (text) svg.replaceChildren();
}

function chosenRecords() {
  return state.records.slice(+$("from").value, +$("to").value + 1);
}

function render() {
  const records = chosenRecords();
  $("from-step").textContent = records.length ? records[0].step : "-";
  $("to-step").textContent = records.length ? records[records.length - 1].step : "-";
  if (!records.length) return;
  const numLayers = records[0].layers.length, layer = state.layer;
  const span = `steps ${records[0].step}-${records[records.length - 1].step}`;
  // Load counts summed over the chosen records, as a share of each layer's routed rows.
  const share = Array.from({ length: numLayers }, (_, l) => {
    const sum = records[0].layers[l].load.map(() => 0);
    for (const r of records) r.layers[l].load.forEach((v, e) => { sum[e] += v; });
    const total = sum.reduce((a, b) => a + b, 0) || 1;
    return sum.map((v) => v / total);
  });
  heatmap($("heatmap"), share, share.map((_, l) => `layer ${l}`),
    (r, c, v) => `layer ${r}, expert ${c}: load share ${fmt(v)} (${span})`, layer, selectLayer);
  const steps = records.map((r) => r.step);
  const rows = records.map((r) => r.layers[layer]);
  $("layer-title").textContent = `Load share per step, layer ${layer}`;
  heatmap($("layer-heatmap"), rows.map((row) => row.load_share), steps.map((s) => `step ${s}`),
    (r, c, v) => `layer ${layer}, step ${steps[r]}, expert ${c}: load share ${fmt(v)}`, null, null);
  drawTimeShare(records, layer);
  lines($("imbalance"), steps, [{ name: "max/mean", values: rows.map((row) => row.imbalance), colour: "#d62728" }],
    `layer ${layer}`);
  lines($("entropy"), steps, [
    { name: "load", values: rows.map((row) => row.load_entropy), colour: "#1f77b4" },
    { name: "token", values: rows.map((row) => row.token_entropy), colour: "#2ca02c" },
  ], `layer ${layer}`);
  const nmi = rows.map((row) => row.nmi ?? null);
  if (nmi.some((v) => v !== null)) {
    lines($("nmi"), steps, [{ name: "NMI", values: nmi, colour: "#9467bd" }], `layer ${layer}`);
  } else {
    const labelled = state.records.some((r) => r.layers.some((l) => l.nmi !== null && l.nmi !== undefined));
    showNote($("nmi"), labelled ? "no NMI in the chosen steps" : "no labels in this run");
  }
  refreshMatrices();
}

// Each expert's share of the layer's expert time, at the steps whose experts RouterStatsMonitor timed.
function drawTimeShare(records, layer) {
  const timed = records.filter((r) => r.layers[layer].expert_time_share);
  $("time-share-title").textContent = `Expert time share per step, layer ${layer}`;
  if (!timed.length) {
    showNote($("time-share"), "no expert timings in the chosen steps (RouterStatsMonitor time_experts: true)");
    return;
  }
  heatmap($("time-share"), timed.map((r) => r.layers[layer].expert_time_share), timed.map((r) => `step ${r.step}`),
    (r, c, v) => `layer ${layer}, step ${timed[r].step}, expert ${c}: time share ${fmt(v)}, load share `
      + fmt(timed[r].layers[layer].load_share[c]), null, null);
}

// The matrices are summed by the server (the socket leaves them out): one request at a time, the latest choice wins.
function matricesQuery() {
  const records = chosenRecords();
  if (!records.length) return null;
  const start = records[0].step, end = records[records.length - 1].step;
  return `/api/layers/${state.layer}/matrices?start=${start}&end=${end}`;
}

async function refreshMatrices() {
  const query = matricesQuery();
  const key = `${query}#${state.resets}`;
  if (query === null || state.fetching || (state.matrices && state.matrices.key === key)) return;
  state.fetching = true;
  let body;
  try {
    const response = await fetch(query);
    body = await response.json();
    if (!response.ok) throw new Error(body.detail || response.statusText);
  } catch (error) {
    const note = { note: `could not load the matrices: ${error.message}` };
    body = { layer: state.layer, specialisation: note, cooccurrence: note, transitions: note };
  } finally {
    state.fetching = false;
  }
  state.matrices = { key, body };
  if (`${matricesQuery()}#${state.resets}` === key) drawMatrices(body);
  else refreshMatrices();  // the layer or steps changed while this one was on its way
}

function matrixView(id, view, title, rowLabels, tip, m) {
  const svg = $(id);
  Object.assign(svg.dataset, { layer: m.layer, start: m.start ?? "", end: m.end ?? "" });
  $(`${id}-title`).textContent = title;
  if (view.note) showNote(svg, view.note);
  else heatmap(svg, view.share, rowLabels(view), (r, c, v) => tip(view, r, c, v), null, null);
}

function drawMatrices(m) {
  const layer = m.layer, span = m.records ? `steps ${m.start}-${m.end}` : "no steps";
  const of = (view, r, c) => `${fmt(view.counts[r][c])} of ${fmt(view.row_tokens[r])} tokens`;
  const spec = m.specialisation;
  const nmi = spec.nmi === undefined ? "" : `, NMI ${fmt(spec.nmi)}`;
  matrixView("specialisation", spec,
    `Specialisation, layer ${layer}: share of each label's tokens per top-1 expert (${span}${nmi})`,
    (view) => view.rows,
    (view, r, c, v) => `layer ${layer}, ${view.rows[r]}, expert ${c}: ${fmt(v)} of the label (${of(view, r, c)})`, m);
  matrixView("cooccurrence", m.cooccurrence,
    `Co-occurrence, layer ${layer}: share of expert i's tokens (row) that also picked expert j (${span})`,
    (view) => view.share.map((_, i) => `e${i}`),
    (view, r, c, v) => (r === c
      ? `layer ${layer}, expert ${r}: picked by ${fmt(view.counts[r][r])} tokens`
      : `layer ${layer}, expert ${r} with ${c}: ${fmt(v)} of expert ${r}'s tokens (${of(view, r, c)})`), m);
  const next = m.transitions.next_layer;
  matrixView("transitions", m.transitions, next === undefined ? `Transitions from layer ${layer}`
    : `Transitions: top-1 expert at layer ${layer} (row) to top-1 expert at layer ${next} (${span})`,
    (view) => view.share.map((_, i) => `L${layer} e${i}`),
    (view, r, c, v) => `layer ${layer} expert ${r} to layer ${next} expert ${c}: ${fmt(v)} (${of(view, r, c)})`, m);
}

// The fired alarms, newest first; the chosen layer's rows stand out, a row shows its message on hover and a click
// chooses its layer.
function drawAlarms() {
  const table = $("alarms"), alarms = state.alarms;
  $("alarms-title").textContent = alarms.length ? `Alarms: ${alarms.length} fired` : "Alarms";
  table.hidden = !alarms.length;
  table.nextElementSibling.hidden = alarms.length > 0;
  table.tBodies[0].replaceChildren(...alarms.slice().reverse().map((alarm) => {
    const row = document.createElement("tr");
    row.classList.toggle("current", alarm.layer === state.layer);
    Object.assign(row.dataset, { step: alarm.step, layer: alarm.layer, metric: alarm.metric, tip: alarm.message });
    const experts = alarm.experts.length ? alarm.experts.join(", ") : "-";
    for (const value of [alarm.step, alarm.layer, alarm.metric, fmt(alarm.value), alarm.threshold, alarm.action, experts]) {
      row.appendChild(document.createElement("td")).textContent = String(value);
    }
    row.addEventListener("click", () => selectLayer(alarm.layer));
    return row;
  }));
}

function selectLayer(layer) {
  state.layer = layer;
  $("layer").value = String(layer);
  drawAlarms();
  render();
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
  $("status").dataset.records = String(state.records.length);
}

function receive(message) {
  const from = $("from"), to = $("to");
  const following = +to.value === +to.max;  // the range's end keeps up with new records while it sits at the last one
  if (message.reset) {
    state.records = [];
    state.resets += 1;
  }
  if (message.alarms_reset) state.alarms = [];
  state.alarms.push(...message.alarms);
  state.records.push(...message.records);
  const last = Math.max(state.records.length - 1, 0);
  from.max = to.max = String(last);
  if (message.reset) from.value = "0";
  if (following || message.reset) to.value = String(last);
  const numLayers = state.records.length ? state.records[0].layers.length : 0;
  if ($("layer").options.length !== numLayers) {
    $("layer").replaceChildren(...Array.from({ length: numLayers }, (_, l) => new Option(`layer ${l}`, String(l))));
    state.layer = Math.min(state.layer, Math.max(numLayers - 1, 0));
    $("layer").value = String(state.layer);
  }
  drawAlarms();
  if (!state.records.length) {
    setStatus(`waiting for router_stats.jsonl under ${message.run_dir} (train with RouterStatsMonitor)`);
    return;
  }
  setStatus(`${message.stats_file}: ${state.records.length} records, last step ${state.records[last].step}`);
  render();
}

function connect() {
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  socket.onmessage = (event) => receive(JSON.parse(event.data));
  socket.onclose = () => {
    setStatus("lost the dashboard server; retrying every 2 s", true);
    setTimeout(connect, 2000);
  };
}

$("layer").addEventListener("change", () => selectLayer(+$("layer").value));
$("from").addEventListener("input", () => {
  if (+$("from").value > +$("to").value) $("to").value = $("from").value;
  render();
});
$("to").addEventListener("input", () => {
  if (+$("to").value < +$("from").value) $("from").value = $("to").value;
  render();
});
document.addEventListener("mousemove", (event) => {
  const target = event.target.closest && event.target.closest("[data-tip]");
  const tip = $("tip");
  tip.hidden = !target;
  if (!target) return;
  tip.textContent = target.getAttribute("data-tip");
  tip.style.left = `${event.clientX + 12}px`;
  tip.style.top = `${event.clientY + 12}px`;
});
connect();
