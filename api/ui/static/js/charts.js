// Line charts on uPlot (vendored, global `uPlot`): this file only turns metric series into uPlot's
// options and aligned data. Each chart's element carries data-points (points plotted) and data-series
// (names with data), which the browser tests read.

import { h } from "./dom.js";

export const PALETTE = [
  "#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569", "#ea580c",
];

/** Align {name: [{step, value}]} on the union of steps: uPlot's [xs, ys1, ys2, ...] with nulls for gaps. */
export function alignSeries(names, seriesByName) {
  const steps = new Set();
  for (const name of names) for (const point of seriesByName[name] || []) steps.add(point.step);
  const xs = [...steps].sort((a, b) => a - b);
  const index = new Map(xs.map((step, i) => [step, i]));
  const columns = names.map((name) => {
    const column = new Array(xs.length).fill(null);
    for (const point of seriesByName[name] || []) column[index.get(point.step)] = point.value;
    return column;
  });
  return [xs, ...columns];
}

export class LineChart {
  /**
   * @param {HTMLElement} parent where the chart goes
   * @param {object} options title; series [{key, label, scale?}]; scales {id: {label, side?}}; id
   */
  constructor(parent, { title, series, scales = { y: { label: "" } }, id, height = 220 }) {
    this.series = series;
    this.height = height;
    this.empty = h("div", { class: "chart-empty" }, "no data yet");
    this.plotBox = h("div", { class: "chart-plot" });
    this.el = h(
      "figure",
      { class: "chart", id, dataset: { points: "0", series: "" } },
      h("figcaption", {}, title),
      this.plotBox,
      this.empty,
    );
    parent.append(this.el);
    const scaleIds = Object.keys(scales);
    const axes = [
      { label: "step", size: 36 },
      ...scaleIds.map((scale, i) => ({
        scale,
        label: scales[scale].label,
        side: scales[scale].side ?? (i === 0 ? 3 : 1),
        grid: { show: i === 0 },
        size: 60,
        values: tickLabels,
      })),
    ];
    this.plot = new uPlot(
      {
        width: this.width(),
        height,
        scales: { x: { time: false } },
        series: [
          { label: "step" },
          ...series.map((s, i) => ({
            label: s.label ?? s.key,
            scale: s.scale ?? scaleIds[0],
            stroke: s.color ?? PALETTE[i % PALETTE.length],
            width: 1.5,
            spanGaps: true,
            points: { size: 4 },
            value: (_u, v) => (v === null || v === undefined ? "—" : shortNumber(v)),
          })),
        ],
        axes,
        legend: { live: true },
        cursor: { drag: { x: true, y: false } },
      },
      alignSeries(
        series.map((s) => s.key),
        {},
      ),
      this.plotBox,
    );
    this.resizer = new ResizeObserver(() => this.plot.setSize({ width: this.width(), height: this.height }));
    this.resizer.observe(this.el);
  }

  width() {
    return Math.max(200, Math.floor(this.el?.clientWidth || this.plotBox?.clientWidth || 600) - 2);
  }

  /** Replace the plotted data with {key: [{step, value}]}. */
  setData(seriesByKey) {
    const keys = this.series.map((s) => s.key);
    const data = alignSeries(keys, seriesByKey);
    let points = 0;
    const withData = [];
    keys.forEach((key, i) => {
      const n = data[i + 1].filter((v) => v !== null && v !== undefined).length;
      points += n;
      if (n) withData.push(key);
    });
    this.plot.setData(data);
    this.el.dataset.points = String(points);
    this.el.dataset.series = withData.join(",");
    this.empty.hidden = points > 0;
  }

  destroy() {
    this.resizer.disconnect();
    this.plot.destroy();
    this.el.remove();
  }
}

/** Axis labels with as many digits as the tick spacing needs (uPlot's default keeps 3 decimals). */
function tickLabels(_u, ticks, _axis, _space, increment) {
  const magnitude = Math.max(...ticks.map((v) => Math.abs(v ?? 0)));
  const step = Math.abs(increment) || magnitude || 1;
  if (magnitude >= 1e5 || (magnitude > 0 && magnitude < 1e-3)) {
    const digits = Math.max(0, Math.floor(Math.log10(magnitude)) - Math.floor(Math.log10(step)));
    return ticks.map((v) => (v === 0 ? "0" : v.toExponential(Math.min(digits, 6))));
  }
  let decimals = 0;
  while (decimals < 8 && Math.abs(Math.round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-6) decimals++;
  return ticks.map((v) => v.toFixed(decimals));
}

function shortNumber(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}
