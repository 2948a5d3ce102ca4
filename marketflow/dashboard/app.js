// marketflow's dashboard: wires the WebSocket, the board, the chart, health and mode together.
// Frames only change the models; drawing happens at most every RENDER_MS, on animation frames.

import { Board } from './board.js';
import { CandleChart } from './chart.js';
import { HealthPanel } from './health.js';
import { MINUTE_MS, formatAge, throttled } from './model.js';
import { ModeControl } from './mode.js';
import { PriceStream } from './stream.js';

const RENDER_MS = 250;
const $ = (id) => document.getElementById(id);

let clockOffset = 0; // server time - local time, from v1 heartbeats
const serverNow = () => Date.now() + clockOffset;

const board = new Board($('board'), { now: serverNow, onSymbols: updateSymbols });
const chart = new CandleChart({
  box: $('chart'), notice: $('chart-notice'), legend: $('chart-legend'),
  library: document.body.dataset.chartLibrary,
});
const render = throttled(() => {
  board.render();
  chart.render();
}, RENDER_MS);

const mode = new ModeControl({
  name: $('mode-name'), button: $('mode-switch'), message: $('mode-msg'), dialog: $('token-dialog'),
  form: $('token-form'), input: $('token-input'), why: $('token-why'), cancel: $('token-cancel'),
  onMode: (_, sources) => {
    board.setSources(sources);
    health.currentSources = sources;
    updateSources(sources);
    stream.resync(); // a fresh snapshot of the new mode's sources
    render();
  },
});

const health = new HealthPanel({
  status: $('health-status'), stores: $('stores'), feeds: $('feeds'), pipeline: $('pipeline'),
  onHealth: (body) => {
    if (body.mode && body.mode !== mode.mode) mode.refresh(); // switched elsewhere
  },
});

const protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
const stream = new PriceStream(`${protocol}//${location.host}/ws/prices`, {
  onFrame,
  onState: showConnection,
  onOpen: () => {
    markOnce('ws-open');
    mode.refresh();
    chart.reload(); // candles formed while we were away
  },
});

/** User Timing marks for benchmarks/bench_dashboard.py: where the time to first price goes. */
function markOnce(name) {
  if (!performance.getEntriesByName(name).length) performance.mark(name);
}

function onFrame(message) {
  markOnce('first-frame');
  switch (message.type) {
    case 'snapshot': {
      const data = Array.isArray(message.data) ? message.data : [];
      board.snapshot(data);
      const candles = [...data.filter((e) => e && 'interval' in e), ...(message.candles ?? [])];
      chart.onCandles(candles);
      backfill();
      render();
      break;
    }
    case 'prices':
      if (Array.isArray(message.data)) board.update(message.data);
      render();
      break;
    case 'candles':
      if (Array.isArray(message.data) && chart.onCandles(message.data)) render();
      break;
    case 'heartbeat':
      if (Number.isFinite(message.time)) clockOffset = message.time - Date.now();
      break;
    case 'error':
      $('conn').title = `last server message: ${message.error}`;
      break;
    default: // ack, pong, and frame types this page does not know
  }
}

function showConnection(state, detail) {
  const conn = $('conn');
  conn.dataset.state = state;
  if (state === 'open') conn.textContent = 'live';
  else if (state === 'connecting') conn.textContent = detail ? `reconnecting (attempt ${detail + 1})…` : 'connecting…';
  else if (state === 'waiting') conn.textContent = `disconnected — retrying in ${formatAge(detail)}`;
}

/**
 * The 1 m change needs the price a minute ago: seed it from stored 1 s candles, once per key.
 * One key is asked first; only if the server has that minute are the others asked too.
 */
async function backfill() {
  const items = board.needsBackfill();
  if (items.length && await seed(items[0])) await Promise.all(items.slice(1).map(seed));
}

async function seed(item) {
  const at = item.timestamp - MINUTE_MS;
  const url = `/prices/candles/${encodeURIComponent(item.exchange)}/${item.symbol}`
    + `?interval=1s&end=${at + 1}&limit=1`;
  try {
    const response = await fetch(url, { cache: 'no-store' });
    const c = response.ok ? (await response.json())?.candles?.at(-1) : null;
    if (!c || !Number.isFinite(c.close) || c.t > at) return false;
    item.history.seed(c.t, c.close);
    render();
    return true;
  } catch {
    return false; // the page's own history fills in within a minute
  }
}

// --- chart controls --------------------------------------------------------------------------

const symbolSelect = $('chart-symbol');
const sourceSelect = $('chart-source');
const intervalSelect = $('chart-interval');

function updateSymbols(symbols) {
  const have = [...symbolSelect.options].map((o) => o.value);
  if (symbols.every((s) => have.includes(s))) return;
  const current = symbolSelect.value;
  const all = [...new Set([...have, ...symbols])].sort();
  symbolSelect.replaceChildren(...all.map((s) => new Option(s, s)));
  symbolSelect.value = current || (all.includes('BTCUSDT') ? 'BTCUSDT' : all[0]);
  if (!current) selectChart();
}

function updateSources(sources) {
  const current = sourceSelect.value;
  sourceSelect.replaceChildren(new Option('all', 'all'), ...sources.map((s) => new Option(s, s)));
  sourceSelect.value = sources.includes(current) ? current : 'all';
  if (sourceSelect.value !== current) selectChart();
}

function selectChart() {
  const selection = {
    symbol: symbolSelect.value, source: sourceSelect.value, interval: intervalSelect.value,
  };
  if (!selection.symbol) return;
  stream.followCandles(selection.symbol, selection.interval);
  chart.select(selection);
}

for (const select of [symbolSelect, sourceSelect, intervalSelect]) {
  select.addEventListener('change', selectChart);
}
$('chart-controls').addEventListener('submit', (event) => event.preventDefault());

// --- start -------------------------------------------------------------------------------------

if (!document.body.dataset.chartLibrary) $('chart-license').hidden = true;
setInterval(render, 1000); // ages grow between frames
chart.init().then(() => selectChart());
stream.start();
health.start();
mode.refresh();
