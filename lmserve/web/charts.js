// A small canvas line chart: time on x (the last `windowS` seconds), one line per series, a y grid with labels.

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || '#888';
}

// series: [{label, color: '--c1', points: [[tSeconds, value|null], ...]}]
export function drawChart(canvas, series, { windowS = 300, minMax = 1, format = (v) => String(v) } = {}) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap((s) => s.points);
  if (all.length < 2) return;     // nothing drawn until there is a line to draw

  const tMax = Math.max(...all.map((p) => p[0]));
  const tMin = tMax - windowS;
  const values = all.map((p) => p[1]).filter((v) => v !== null && Number.isFinite(v));
  const yMax = Math.max(minMax, ...values) * 1.1;
  const left = 4;
  const top = 12;
  const plotH = h - top - 4;
  const x = (t) => left + ((t - tMin) / windowS) * (w - left - 4);
  const y = (v) => top + plotH - (v / yMax) * plotH;

  ctx.font = '10px system-ui, sans-serif';
  ctx.lineWidth = 1;
  ctx.strokeStyle = cssVar('--border');
  ctx.fillStyle = cssVar('--muted');
  for (const frac of [0, 0.5, 1]) {
    const v = (yMax / 1.1) * frac;
    ctx.beginPath();
    ctx.moveTo(left, Math.round(y(v)) + 0.5);
    ctx.lineTo(w - 4, Math.round(y(v)) + 0.5);
    ctx.stroke();
    if (frac > 0) ctx.fillText(format(v), left + 2, y(v) - 2);
  }
  ctx.lineWidth = 2;
  for (const s of series) {
    ctx.strokeStyle = cssVar(s.color);
    ctx.beginPath();
    let drawing = false;
    for (const [t, v] of s.points) {
      if (t < tMin || v === null || !Number.isFinite(v)) { drawing = false; continue; }
      if (drawing) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      drawing = true;
    }
    ctx.stroke();
  }
}
