// The candle chart: REST history (GET /prices/candles/...) plus the forming candle over the
// WebSocket (protocol v1 `candles` frames), drawn by lightweight-charts with a tick-count histogram.

import { formatCount, formatPrice } from './model.js';

const UP = '#26a69a';
const DOWN = '#ef5350';

export class CandleChart {
  constructor({ box, notice, legend, library }) {
    this.box = box;
    this.notice = notice;
    this.legend = legend;
    this.library = library; // address of the library module, '' when it is not installed
    this.lib = null;
    this.chart = null;
    this.selection = null; // {symbol, source, interval}
    this.candles = new Map(); // t (ms) -> candle, for the current selection
    this.pending = new Map(); // WebSocket candles not drawn yet
    this.loading = false;
    this.generation = 0;
    this.updates = 0; // WebSocket candles applied (the tests watch it)
  }

  async init() {
    if (!this.library) {
      this.say('chart library not installed — run `npm ci` (make run does) to see candles');
      return false;
    }
    try {
      this.lib = await import(this.library);
    } catch {
      this.say('chart library not installed — it could not be loaded');
      return false;
    }
    const { createChart, CandlestickSeries, HistogramSeries } = this.lib;
    const dark = matchMedia('(prefers-color-scheme: dark)').matches;
    this.chart = createChart(this.box, {
      autoSize: true,
      layout: {
        attributionLogo: false, // its logo needs an inline <style>; the footer carries the link
        background: { color: 'transparent' },
        textColor: dark ? '#c9d1d9' : '#24292f',
      },
      grid: {
        vertLines: { color: dark ? '#21262d' : '#eaeef2' },
        horzLines: { color: dark ? '#21262d' : '#eaeef2' },
      },
      timeScale: { timeVisible: true, secondsVisible: false },
      localization: { priceFormatter: formatPrice },
    });
    this.series = this.chart.addSeries(CandlestickSeries, {
      upColor: UP, downColor: DOWN, borderVisible: false, wickUpColor: UP, wickDownColor: DOWN,
    });
    this.series.priceScale().applyOptions({ scaleMargins: { top: 0.08, bottom: 0.28 } });
    this.counts = this.chart.addSeries(HistogramSeries, {
      priceScaleId: 'counts', priceFormat: { type: 'volume' }, lastValueVisible: false,
      priceLineVisible: false,
    });
    this.chart.priceScale('counts').applyOptions({ scaleMargins: { top: 0.78, bottom: 0 } });
    return true;
  }

  say(text) {
    this.notice.textContent = text;
    this.notice.hidden = !text;
  }

  /** Show `symbol` from `source` ('all' for across sources) at `interval`. */
  select(selection) {
    this.selection = { ...selection };
    this.candles.clear();
    this.pending.clear();
    if (this.chart) {
      this.series.setData([]);
      this.counts.setData([]);
      this.chart.applyOptions({ timeScale: { secondsVisible: selection.interval.endsWith('s') } });
    }
    this.renderLegend();
    return this.reload();
  }

  /** Fetch the history again (a new selection, or a reconnect that may have missed candles). */
  async reload() {
    if (!this.selection || !this.chart) return;
    const generation = ++this.generation;
    const { symbol, source, interval } = this.selection;
    const path = source === 'all' ? symbol : `${encodeURIComponent(source)}/${symbol}`;
    this.loading = true;
    let candles = null;
    let problem = '';
    try {
      const response = await fetch(`/prices/candles/${path}?interval=${interval}&limit=500`,
        { cache: 'no-store' });
      if (response.ok) {
        candles = (await response.json()).candles;
        if (!Array.isArray(candles)) problem = 'candles unavailable (unexpected answer)';
      } else if (response.status === 404) {
        candles = [];
      } else {
        problem = `candles unavailable (HTTP ${response.status})`;
      }
    } catch {
      problem = 'candles unavailable (server unreachable)';
    }
    if (generation !== this.generation) return; // another selection won
    this.loading = false;
    if (candles) {
      for (const c of candles) if (validCandle(c)) this.candles.set(c.t, c);
      // Candles that arrived over the WebSocket meanwhile are at least as new.
      for (const [t, c] of this.pending) this.candles.set(t, c);
      this.pending.clear();
      this.drawAll();
    }
    this.say(problem || (this.candles.size ? '' : 'no candles yet'));
  }

  /** Candle entries from a `candles` frame or a snapshot (protocol v1). */
  onCandles(entries) {
    if (!this.selection) return false;
    const { symbol, source, interval } = this.selection;
    let mine = false;
    for (const c of entries) {
      if (c && c.symbol === symbol && c.exchange === source && c.interval === interval
          && validCandle(c)) {
        this.pending.set(c.t, c);
        mine = true;
      }
    }
    return mine;
  }

  /** Apply the WebSocket candles that arrived since the last frame drawn. */
  render() {
    if (!this.chart || this.loading || !this.pending.size) return;
    const lastT = this.candles.size ? Math.max(...this.candles.keys()) : -Infinity;
    const fresh = [...this.pending.values()].sort((a, b) => a.t - b.t);
    this.pending.clear();
    const rewrite = fresh.some((c) => c.t < lastT && !this.candles.has(c.t));
    for (const c of fresh) this.candles.set(c.t, c);
    this.updates += fresh.length;
    if (rewrite) {
      this.drawAll();
    } else {
      for (const c of fresh) {
        this.series.update(bar(c), c.t < lastT);
        this.counts.update(countBar(c), c.t < lastT);
      }
    }
    this.say('');
    this.renderLegend();
  }

  drawAll() {
    const sorted = [...this.candles.values()].sort((a, b) => a.t - b.t);
    this.series.setData(sorted.map(bar));
    this.counts.setData(sorted.map(countBar));
    this.renderLegend();
  }

  renderLegend() {
    const sel = this.selection;
    const legend = this.legend;
    if (!sel) { legend.textContent = ''; return; }
    const last = this.candles.size ? this.candles.get(Math.max(...this.candles.keys())) : null;
    legend.dataset.updates = String(this.updates);
    if (!last) {
      legend.textContent = `${sel.symbol} · ${sel.source} · ${sel.interval}`;
      delete legend.dataset.t;
      return;
    }
    legend.dataset.t = String(last.t);
    legend.dataset.close = String(last.close);
    legend.dataset.count = String(last.count);
    legend.dataset.closed = String(Boolean(last.closed));
    const time = new Date(last.t).toISOString().replace('T', ' ').slice(0, 19);
    legend.textContent = `${sel.symbol} · ${sel.source} · ${sel.interval} · ${time} UTC `
      + `O ${formatPrice(last.open)} H ${formatPrice(last.high)} L ${formatPrice(last.low)} `
      + `C ${formatPrice(last.close)} · ${formatCount(last.count)} ticks`
      + (last.closed ? '' : ' · forming');
  }
}

function validCandle(c) {
  return c && Number.isFinite(c.t) && Number.isFinite(c.open) && Number.isFinite(c.high)
    && Number.isFinite(c.low) && Number.isFinite(c.close) && Number.isFinite(c.count);
}

const bar = (c) => ({ time: c.t / 1000, open: c.open, high: c.high, low: c.low, close: c.close });

const countBar = (c) => ({
  time: c.t / 1000, value: c.count, color: c.close >= c.open ? `${UP}80` : `${DOWN}80`,
});
