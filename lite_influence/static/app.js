// The page of `lite-influence serve`: plain DOM, no framework, no build step, no network
// beyond this server's /api. Texts are set with textContent only (training data is untrusted).
"use strict";

const $ = (id) => document.getElementById(id);
let indexes = {};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function showError(box, error) {
  box.hidden = !error;
  box.textContent = error ? error.message || String(error) : "";
}

function current() { return indexes[$("index").value]; }

function labelName(info, label) {
  if (label === null || label === undefined) return "";
  const names = info.label_names || [];
  return typeof label === "number" && names[label] !== undefined ? names[label] : String(label);
}

function fillOptions(select, values, keep) {
  const old = select.value;
  select.replaceChildren(...keep.map((n) => n.cloneNode(true)), ...values.map((v) => el("option", {value: v}, v)));
  if ([...select.options].some((o) => o.value === old)) select.value = old;
}

function onIndexChange() {
  const info = current();
  if (!info) return;
  $("index-info").textContent = `${info.n} training examples · ${info.layers.length} layers · ${info.task} · ${info.metric}`;
  const lm = info.task === "causal-lm";
  document.querySelectorAll(".lm-only").forEach((n) => { n.hidden = !lm; });
  document.querySelectorAll(".classification-only").forEach((n) => { n.hidden = lm; });
  fillOptions($("label"), info.label_names || [], [el("option", {value: ""}, "(the prediction)")]);
  const groups = Object.keys(info.groups).filter((g) => info.groups[g].length);
  const chosen = $("layers").value;  // "" before the first index is shown: then all layers
  fillOptions($("layers"), [...groups, ...info.layers.filter((l) => !groups.includes(l))], []);
  $("layers").value = groups.includes(chosen) ? chosen : (groups.includes("all") ? "all" : groups[0]);
  fillOptions($("metric"), info.metrics || [info.metric], []);  // what the index answers; its default first
  $("metric").value = info.metric;
  showAudit(info);
}

function request() {
  const info = current();
  const body = {index: info.name, text: $("text").value, k: Number($("k").value), layers: $("layers").value, agg: $("agg").value,
                metric: $("metric").value, score: $("score").value};
  if (info.task === "causal-lm") {
    if ($("completion").value) body.completion = $("completion").value;
  } else {
    if ($("pair").value) body.pair = $("pair").value;
    if ($("label").value) body.label = $("label").value;
  }
  return body;
}

function bars(perLayer, layers, scale) {
  const box = el("div", {class: "bars"});
  for (const layer of layers) {
    const value = perLayer[layer] ?? 0;
    const height = scale > 0 ? Math.min(50, 50 * Math.abs(value) / scale) : 0;
    const fill = el("span", {class: value >= 0 ? "pos" : "neg", style: `height:${height}%`});
    box.append(el("div", {class: "bar", title: `${layer}: ${value.toPrecision(3)}`}, fill));
  }
  return box;
}

function table(node, rows, result, info) {
  const scale = Math.max(0, ...rows.flatMap((r) => Object.values(r.per_layer).map(Math.abs)));
  const scoreName = {vote: "votes", rank: "mean rank", mean: "influence"}[result.agg];
  const head = el("thead", {}, el("tr", {}, el("th", {}, "id"), el("th", {}, "label"), el("th", {}, scoreName),
    el("th", {title: result.layers.join(", ")}, "per layer"), el("th", {}, "text")));
  const body = el("tbody");
  for (const row of rows) {
    const text = row.completion !== undefined ? `${row.text ?? ""} ⟶ ${row.completion}` : row.text + (row.pair ? ` ‖ ${row.pair}` : "");
    const tr = el("tr", {"data-id": row.id}, el("td", {class: "num"}, row.id),
      el("td", {}, el("span", {class: "label"}, labelName(info, row.label))),
      el("td", {class: "num"}, Number(row.score).toPrecision(4)),
      el("td", {}, bars(row.per_layer, result.layers, scale)), el("td", {class: "text"}, text));
    tr.addEventListener("click", () => showExample(info, row.id));
    body.append(tr);
  }
  node.replaceChildren(head, body);
}

function showPrediction(result, info) {
  const q = result.query;
  const box = $("prediction");
  if (q.id !== undefined) {
    box.replaceChildren(`training example #${q.id} (label ${labelName(info, q.label)}), from its stored vectors: `,
      el("q", {}, q.text));
  } else if (q.prediction) {
    box.replaceChildren("prediction: ", el("span", {class: "label"}, q.prediction.label_name),
      ` (p = ${q.prediction.probability.toFixed(3)}) · explaining label `, el("span", {class: "label"}, q.label_name),
      ` · loss ${q.loss.toFixed(3)}`);
  } else {
    box.replaceChildren(`explaining the ${q.completion_source} completion `, el("q", {}, q.completion),
      ` · ${q.argmax_matches}/${q.completion_tokens} tokens argmax · loss ${q.loss.toFixed(3)}`);
  }
}

async function submit(event) {
  event.preventDefault();
  const info = current();
  $("submit").disabled = true;
  try {
    const body = request();
    const result = await api("/api/query", body);
    toAddress(body);
    showError($("error"), null);
    showPrediction(result, info);
    table($("proponents"), result.proponents, result, info);
    table($("opponents"), result.opponents, result, info);
    $("timings").textContent = `${result.agg} over ${result.layers.join(", ")} · ${result.metric}${result.score === "curvature" ? " · curvature" : ""} · k = ${result.k} · ` +
      `query ${result.timings.query_ms.toFixed(1)} ms on the server`;
    $("result").hidden = false;
  } catch (error) {
    showError($("error"), error);
  } finally {
    $("submit").disabled = false;
  }
}

async function showExample(info, id) {
  const aside = $("example");
  showError($("example-error"), null);
  try {
    const example = await api(`/api/example/${encodeURIComponent(info.name)}/${id}`);
    $("example-title").textContent = `training example ${id}`;
    const fields = Object.entries(example).map(([key, value]) => [key, key === "label" ? labelName(info, value) : value]);
    $("example-fields").replaceChildren(...fields.flatMap(([key, value]) => [el("dt", {}, key),
      el("dd", {}, typeof value === "object" && value !== null ? JSON.stringify(value) : value)]));
    $("explain-example").onclick = () => explainExample(info, id);
    aside.hidden = false;
  } catch (error) {
    showError($("error"), error);
  }
}

async function explainExample(info, id) {
  // Query by id: the example's own stored vectors are the query; no model runs.
  try {
    const result = await api("/api/query_by_id", {index: info.name, id, k: Number($("k").value), layers: $("layers").value,
                                                  agg: $("agg").value, metric: $("metric").value,
                                                  score: $("score").value});
    showError($("example-error"), null);
    showPrediction(result, info);
    table($("proponents"), result.proponents, result, info);
    table($("opponents"), result.opponents, result, info);
    $("timings").textContent = `${result.agg} over ${result.layers.join(", ")} · ${result.metric} · k = ${result.k} · ` +
      "training example's stored vectors (no model)";
    $("result").hidden = false;
  } catch (error) {
    showError($("example-error"), error);
  }
}

// A query can be linked to: /?index=NAME&text=...&label=...&layers=...&agg=...&metric=...&score=...&k=... runs it;
// /?index=NAME&id=17 explains training example 17 (as clicking its row and "explain" does).
// A saved audit (`lite-influence audit INDEX QUERIES --save`): its NDR table with the
// baselines, each group's detection curve (inline SVG), and the ranking with its noise flags.
async function showAudit(info) {
  let audit;
  try {
    audit = await api(`/api/audit/${encodeURIComponent(info.name)}`);
  } catch (error) {
    $("audit").hidden = true;  // no saved audit for this index
    return;
  }
  const levels = audit.levels.map((p) => `ndr@${Math.round(p * 1000) / 10}`.replace(/\.0$/, ""));
  const keys = [...levels, "auc_ndr"];
  $("audit-title").textContent = `${audit.n} training examples, ${audit.n_queries} queries, ` +
    `${audit.n_noisy ?? "no"} known noisy, ${audit.metric}`;
  const head = el("tr", {}, el("th", {}, "scope"), el("th", {}, "agg"), ...keys.map((k) => el("th", {}, k.toUpperCase())));
  const rows = audit.table.map((row) => el("tr", {}, el("td", {}, row.scope), el("td", {}, row.agg),
    ...keys.map((k) => el("td", {class: "num"}, row[k] === undefined ? "-" : row[k].toFixed(3)))));
  const baselines = Object.entries(audit.baselines || {}).map(([name, values]) => el("tr", {class: "muted"},
    el("td", {}, name), el("td", {}, ""), ...keys.map((k) => el("td", {class: "num"}, values[k] === undefined ? "-" : values[k].toFixed(3)))));
  $("audit-table").replaceChildren(head, ...rows, ...baselines);
  drawCurves($("audit-curves"), audit.curves);
  $("audit-ranking-title").textContent = `(all layers, ${audit.ranking.agg}; first ${audit.ranking.rows.length})`;
  $("audit-ranking").replaceChildren(el("tr", {}, el("th", {}, "rank"), el("th", {}, "id"), el("th", {}, "label"), el("th", {}, "text")),
    ...audit.ranking.rows.slice(0, 50).map((r) => el("tr", {class: r.noisy ? "noisy" : ""}, el("td", {class: "num"}, r.rank + 1),
      el("td", {class: "num"}, r.id), el("td", {}, labelName(info, r.label) + (r.noisy ? " (noisy)" : "")), el("td", {}, r.text))));
  $("audit").hidden = false;
}

function drawCurves(svg, curves) {
  const ns = svg.namespaceURI;  // the SVG namespace, from the page (no URL in this file)
  svg.replaceChildren();
  if (!curves) return;
  const colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
  const line = (xs, ys, colour, dash) => {
    const path = document.createElementNS(ns, "polyline");
    path.setAttribute("points", xs.map((x, i) => `${20 + 280 * x},${220 - 200 * ys[i]}`).join(" "));
    path.setAttribute("fill", "none"); path.setAttribute("stroke", colour);
    if (dash) path.setAttribute("stroke-dasharray", "4 3");
    svg.append(path);
  };
  line([0, 1], [0, 1], "#888", true);  // random
  Object.entries(curves.groups).forEach(([name, ys], i) => {
    line(curves.x, ys, colours[i % colours.length], false);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 230); label.setAttribute("y", 150 + 12 * i); label.setAttribute("font-size", "10");
    label.setAttribute("fill", colours[i % colours.length]); label.textContent = name;
    svg.append(label);
  });
}

function fromAddress() {
  const params = new URLSearchParams(window.location.search);
  if (params.get("index") && indexes[params.get("index")]) $("index").value = params.get("index");
  onIndexChange();
  for (const key of ["text", "pair", "completion", "label", "layers", "agg", "metric", "score", "k"]) {
    if (params.has(key)) $(key).value = params.get(key);
  }
  if (params.get("text")) $("query-form").requestSubmit();
  else if (params.get("id")) explainExample(current(), Number(params.get("id")));  // /?index=NAME&id=17
}

function toAddress(body) {
  const params = new URLSearchParams(Object.entries(body).map(([key, value]) => [key, String(value)]));
  window.history.replaceState(null, "", `?${params}`);
}

async function start() {
  $("index").addEventListener("change", onIndexChange);
  $("query-form").addEventListener("submit", submit);
  $("close-example").addEventListener("click", () => { $("example").hidden = true; });
  try {
    const data = await api("/api/indexes");
    indexes = Object.fromEntries(data.indexes.map((info) => [info.name, info]));
    fillOptions($("index"), Object.keys(indexes), []);
    fromAddress();
  } catch (error) {
    showError($("error"), error);
  }
}

start();
