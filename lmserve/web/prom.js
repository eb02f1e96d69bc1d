// Prometheus text format -> numbers, and histogram quantiles over a time window (as histogram_quantile does).

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

// name -> [{labels, value}]
export function parsePrometheus(text) {
  const metrics = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] ?? '').matchAll(LABEL)) labels[k] = v;
    if (!metrics.has(m[1])) metrics.set(m[1], []);
    metrics.get(m[1]).push({ labels, value: Number(m[3]) });
  }
  return metrics;
}

export function scalar(metrics, name, fallback = 0) {
  const samples = metrics?.get(name);
  return samples?.length ? samples.reduce((s, x) => s + x.value, 0) : fallback;
}

// Cumulative bucket counts of histogram `name`, sorted by upper bound: [[le, count], ...].
export function buckets(metrics, name) {
  return (metrics?.get(`${name}_bucket`) ?? [])
    .map((s) => [s.labels.le === '+Inf' ? Infinity : Number(s.labels.le), s.value])
    .sort((a, b) => a[0] - b[0]);
}

// q-quantile of the observations made between two bucket snapshots; null when there were none.
export function quantile(q, now, then) {
  const before = new Map(then.map(([le, c]) => [le, c]));
  const delta = now.map(([le, c]) => [le, c - (before.get(le) ?? 0)]);
  const total = delta.at(-1)?.[1] ?? 0;
  if (total <= 0) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, count] of delta) {
    if (count >= rank) {
      if (le === Infinity) return prevLe;
      const inBucket = count - prevCount;
      return inBucket > 0 ? prevLe + (le - prevLe) * ((rank - prevCount) / inBucket) : le;
    }
    prevLe = le;
    prevCount = count;
  }
  return prevLe;
}
