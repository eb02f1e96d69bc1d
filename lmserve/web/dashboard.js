// The live dashboard. Against an api_server it polls /metrics (open without a key); against the proxy it polls
// /nodes/status (with the key) and shows each node's health, load and latency.
import { getJSON, getText } from './api.js';
import { drawChart } from './charts.js';
import { buckets, parsePrometheus, quantile, scalar } from './prom.js';

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
const HISTORY_S = 300;        // what the charts show
const LATENCY_WINDOW_S = 60;  // TTFT / ITL percentiles are over this window
const RATE_WINDOW_S = 5;
const P = 'lmserve:';

const fmt = {
  int: (v) => (v === null ? '–' : String(Math.round(v))),
  pct: (v) => (v === null ? '–' : `${(v * 100).toFixed(1)}%`),
  rate: (v) => (v === null ? '–' : v.toFixed(1)),
  ms: (v) => (v === null ? '–' : v >= 1 ? `${v.toFixed(2)} s` : `${(v * 1000).toFixed(0)} ms`),
};

let mode = null;        // 'server' | 'proxy'
let timer = null;
let snapshots = [];     // [{t, metrics}] (server) or [{t, nodes}] (proxy), newest last
const tiles = new Map(); // id -> {node, spec}

function tile(id, title, spec) {
  const node = document.createElement('div');
  node.className = 'tile';
  node.dataset.metric = id;
  const h = document.createElement('h3');
  h.textContent = title;
  const value = document.createElement('div');
  value.className = 'value';
  const canvas = document.createElement('canvas');
  canvas.setAttribute('role', 'img');
  canvas.setAttribute('aria-label', `${title} over the last ${HISTORY_S / 60} minutes`);
  const legend = document.createElement('div');
  legend.className = 'legend';
  legend.textContent = spec.series.map((s) => s.label).join(' · ');
  node.append(h, value, canvas, legend);
  $('tiles').append(node);
  tiles.set(id, { node, spec });
}

// ' · priority -1: 1 running, 0 waiting · ...' when requests carry more than one priority level, else ''.
function byPriority(metrics) {
  const levels = new Map();
  for (const kind of ['running', 'waiting']) {
    for (const { labels, value } of metrics.get(`${P}num_requests_${kind}_by_priority`) ?? []) {
      const level = levels.get(labels.priority) ?? { running: 0, waiting: 0 };
      level[kind] = value;
      levels.set(labels.priority, level);
    }
  }
  if (levels.size < 2) return '';
  return [...levels.entries()].sort((a, b) => Number(a[0]) - Number(b[0]))
    .map(([p, l]) => ` · priority ${p}: ${fmt.int(l.running)} running, ${fmt.int(l.waiting)} waiting`).join('');
}

// Each tile: series = [{label, color, value(snapshotIndex) -> number|null}], text(latest values) -> string.
function serverTiles() {
  const at = (i, name) => scalar(snapshots[i].metrics, P + name);
  const rate = (i, name) => {     // over the last RATE_WINDOW_S: per-second deltas are too spiky to read
    let j = i;
    while (j > 0 && snapshots[i].t - snapshots[j - 1].t <= RATE_WINDOW_S) j -= 1;
    const dt = snapshots[i].t - snapshots[j].t;
    return dt > 0 ? Math.max(0, at(i, name) - at(j, name)) / dt : null;
  };
  const windowStart = (i) => {
    let j = i;
    while (j > 0 && snapshots[i].t - snapshots[j - 1].t <= LATENCY_WINDOW_S) j -= 1;
    return j;
  };
  const pct = (q, name) => (i) => quantile(q, buckets(snapshots[i].metrics, P + name),
    buckets(snapshots[windowStart(i)].metrics, P + name));
  tile('requests', 'Requests', {
    series: [{ label: 'running', color: '--c1', value: (i) => at(i, 'num_requests_running') },
      { label: 'waiting', color: '--c2', value: (i) => at(i, 'num_requests_waiting') }],
    text: ([r, w]) => `${fmt.int(r)} running · ${fmt.int(w)} waiting${byPriority(snapshots.at(-1).metrics)}`,
    format: fmt.int,
  });
  tile('kv_cache', 'KV-cache usage', {
    series: [{ label: 'blocks in use', color: '--c3', value: (i) => at(i, 'kv_cache_usage_perc') }],
    text: ([u]) => fmt.pct(u), format: fmt.pct, minMax: 1,
  });
  tile('prefix_cache', 'Prefix-cache hit rate (since start)', {
    series: [{ label: 'hits / prompt tokens looked up', color: '--c4', value: (i) => at(i, 'prefix_cache_hit_rate') }],
    text: ([r]) => fmt.pct(r), format: fmt.pct, minMax: 1,
  });
  tile('throughput', `Output tokens/s (${RATE_WINDOW_S} s average)`, {
    series: [{ label: 'generated tokens per second', color: '--c1', value: (i) => rate(i, 'generation_tokens_total') }],
    text: ([r]) => `${fmt.rate(r)} tok/s · ${fmt.int(at(snapshots.length - 1, 'generation_tokens_total'))} total`,
    format: fmt.rate,
  });
  tile('ttft', `Time to first token (last ${LATENCY_WINDOW_S} s)`, {
    series: [{ label: 'p50', color: '--c1', value: pct(0.5, 'time_to_first_token_seconds') },
      { label: 'p95', color: '--c2', value: pct(0.95, 'time_to_first_token_seconds') }],
    text: ([a, b]) => `p50 ${fmt.ms(a)} · p95 ${fmt.ms(b)}`, format: fmt.ms, minMax: 0.01,
  });
  tile('itl', `Inter-token latency (last ${LATENCY_WINDOW_S} s)`, {
    series: [{ label: 'p50', color: '--c1', value: pct(0.5, 'time_per_output_token_seconds') },
      { label: 'p95', color: '--c2', value: pct(0.95, 'time_per_output_token_seconds') }],
    text: ([a, b]) => `p50 ${fmt.ms(a)} · p95 ${fmt.ms(b)}`, format: fmt.ms, minMax: 0.01,
  });
}

function proxyTiles() {
  const nodes = (i) => Object.values(snapshots[i].nodes);
  tile('in_flight', 'Requests in flight (all nodes)', {
    series: [{ label: 'in flight', color: '--c1', value: (i) => nodes(i).reduce((s, n) => s + n.unfinished, 0) }],
    text: ([v]) => fmt.int(v), format: fmt.int,
  });
  tile('healthy', 'Healthy nodes', {
    series: [{ label: 'healthy', color: '--c3', value: (i) => nodes(i).filter((n) => n.is_healthy).length },
      { label: 'registered', color: '--c2', value: (i) => nodes(i).length }],
    text: ([h, n]) => `${fmt.int(h)} of ${fmt.int(n)}`, format: fmt.int,
  });
  tile('latency', 'Mean request latency (recent, all nodes)', {
    series: [{ label: 'mean', color: '--c4', value: (i) => {
      const all = nodes(i).flatMap((n) => n.latency ?? []);
      return all.length ? all.reduce((s, x) => s + x, 0) / all.length : null;
    } }],
    text: ([v]) => fmt.ms(v), format: fmt.ms, minMax: 0.01,
  });
}

function nodeTable(nodes) {
  const table = document.createElement('table');
  table.className = 'nodes';
  const head = table.createTHead().insertRow();
  for (const h of ['Node', 'Health', 'Models', 'In flight', 'Served', 'Mean latency', 'Last error']) {
    const th = document.createElement('th');
    th.textContent = h;
    head.append(th);
  }
  const body = table.createTBody();
  for (const [url, n] of Object.entries(nodes)) {
    const row = body.insertRow();
    row.dataset.node = url;
    const lat = n.latency?.length ? n.latency.reduce((s, x) => s + x, 0) / n.latency.length : null;
    const cells = [url, n.is_healthy ? 'healthy' : 'unhealthy', (n.models ?? []).join(', '), n.unfinished,
      n.num_served, fmt.ms(lat), n.last_error ?? ''];
    cells.forEach((text, k) => {
      const td = row.insertCell();
      td.textContent = String(text);
      if (k === 1) td.className = n.is_healthy ? 'healthy' : 'unhealthy';
    });
  }
  const wrap = document.createElement('div');
  wrap.className = 'nodes-wrap';
  wrap.append(table);
  $('nodes').replaceChildren(wrap);
}

function draw() {
  const last = snapshots.length - 1;
  if (last < 0) return;
  for (const { node, spec } of tiles.values()) {
    const points = spec.series.map((s) => ({
      label: s.label, color: s.color, points: snapshots.map((snap, i) => [snap.t, s.value(i)]),
    }));
    node.querySelector('.value').textContent = spec.text(points.map((p) => p.points[last][1]));
    const canvas = node.querySelector('canvas');
    if (canvas.offsetParent !== null) {
      drawChart(canvas, points, { windowS: HISTORY_S, minMax: spec.minMax ?? 1, format: spec.format });
    }
  }
}

async function poll() {
  const t = performance.now() / 1000;
  try {
    if (mode === 'server') snapshots.push({ t, metrics: parsePrometheus(await getText('metrics')) });
    else {
      const nodes = await getJSON('nodes/status');
      snapshots.push({ t, nodes });
      nodeTable(nodes);
    }
    snapshots = snapshots.filter((s) => t - s.t <= HISTORY_S + LATENCY_WINDOW_S);
    $('dash-status').textContent = `Live: polled every ${POLL_MS / 1000} s; charts show the last ${HISTORY_S / 60} minutes.`;
    draw();
  } catch (e) {
    $('dash-status').textContent = `Cannot read the server's figures: ${e.message}`;
  }
}

export async function initDashboard() {
  try {
    const health = await (await fetch('health')).json();
    mode = 'num_nodes' in health ? 'proxy' : 'server';
  } catch {
    mode = 'server';
  }
  document.body.dataset.mode = mode;
  if (mode === 'proxy') proxyTiles(); else serverTiles();
  window.addEventListener('resize', draw);
  startDashboard();
}

export { draw as drawDashboard };

// Polling runs from the start, so the charts already have history when the dashboard is opened.
export function startDashboard() {
  poll();
  timer = setInterval(poll, POLL_MS);
}

export function refreshDashboard() {
  snapshots = [];
  poll();
}
