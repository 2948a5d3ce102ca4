// The board: every symbol × source of the current mode, drawn at most a few times a second.

import {
  MINUTE_MS, PriceHistory, change, direction, formatAge, formatBp, formatPercent, formatPrice,
  median,
} from './model.js';

const FLASH_GAP_MS = 500; // a cell flashes at most twice a second

const keyOf = (symbol, exchange) => `${symbol}\u0000${exchange}`;

export class Board {
  constructor(root, { now, onSymbols }) {
    this.root = root;
    this.now = now; // server-aligned Date.now()
    this.onSymbols = onSymbols;
    this.keys = new Map(); // key -> {symbol, exchange, price, timestamp, history, shown, flip, row}
    this.sources = null; // the current mode's sources (null until /mode answered)
    this.layoutDirty = true;
    this.firstPrice = false;
  }

  /** A snapshot covers the whole subscription: it replaces what the board holds. */
  snapshot(entries) {
    const seen = new Set();
    for (const e of entries) {
      if (isPrice(e)) seen.add(keyOf(e.symbol, e.exchange));
    }
    for (const k of [...this.keys.keys()]) {
      if (!seen.has(k)) { this.keys.delete(k); this.layoutDirty = true; }
    }
    this.update(entries);
  }

  update(entries) {
    for (const e of entries) {
      if (!isPrice(e)) continue;
      if (this.sources && !this.sources.includes(e.exchange)) continue;
      const k = keyOf(e.symbol, e.exchange);
      let item = this.keys.get(k);
      if (!item) {
        item = { symbol: e.symbol, exchange: e.exchange, price: null, timestamp: 0,
          history: new PriceHistory(), shown: null, flip: false, flashedAt: -Infinity, row: null,
          backfilled: false };
        this.keys.set(k, item);
        this.layoutDirty = true;
      }
      if (e.timestamp >= item.timestamp) {
        item.price = e.price;
        item.timestamp = e.timestamp;
      }
      item.history.add(e.timestamp, e.price);
    }
  }

  /** The mode changed (or was learnt): keep only its sources. */
  setSources(sources) {
    this.sources = [...sources];
    for (const [k, item] of [...this.keys]) {
      if (!this.sources.includes(item.exchange)) { this.keys.delete(k); this.layoutDirty = true; }
    }
  }

  /** Keys whose history does not reach a minute back yet (to seed from stored candles). */
  needsBackfill() {
    const out = [];
    for (const item of this.keys.values()) {
      if (!item.backfilled && !item.history.reaches(item.timestamp - MINUTE_MS)) {
        item.backfilled = true;
        out.push(item);
      }
    }
    return out;
  }

  symbols() {
    return [...new Set([...this.keys.values()].map((i) => i.symbol))].sort();
  }

  render() {
    if (this.layoutDirty) this.layout();
    const now = this.now();
    const bySymbol = new Map();
    for (const item of this.keys.values()) {
      if (item.price == null) continue;
      if (!bySymbol.has(item.symbol)) bySymbol.set(item.symbol, []);
      bySymbol.get(item.symbol).push(item.price);
    }
    const medians = new Map([...bySymbol].map(([s, prices]) => [s, median(prices)]));
    for (const [symbol, card] of this.cards) {
      card.median.textContent = medians.has(symbol) ? `median ${formatPrice(medians.get(symbol))}` : '';
    }
    for (const item of this.keys.values()) {
      const cells = item.row;
      if (item.price == null) continue;
      if (item.price !== item.shown) {
        const dir = direction(item.price, item.shown);
        cells.price.textContent = formatPrice(item.price);
        cells.price.dataset.value = String(item.price);
        if (dir && performance.now() - item.flashedAt >= FLASH_GAP_MS) {
          item.flashedAt = performance.now();
          // Two identical animations under two names: switching names restarts the flash.
          item.flip = !item.flip;
          cells.price.dataset.flash = `${dir > 0 ? 'up' : 'down'}-${item.flip ? 'a' : 'b'}`;
        }
        item.shown = item.price;
        if (!this.firstPrice) {
          this.firstPrice = true;
          performance.mark('first-price');
        }
      }
      const before = item.history.priceAt(item.timestamp - MINUTE_MS);
      const ch = change(item.price, before);
      cells.change.textContent = formatPercent(ch);
      cells.change.dataset.sign = ch == null ? '' : ch > 0 ? 'up' : ch < 0 ? 'down' : '';
      cells.change.title = ch == null ? 'less than a minute of history yet' : '';
      const m = medians.get(item.symbol);
      cells.spread.textContent = bySymbol.get(item.symbol).length > 1 ? formatBp(item.price / m - 1) : '—';
      cells.age.textContent = formatAge(now - item.timestamp);
      cells.age.dataset.stale = now - item.timestamp > 10_000 ? 'true' : 'false';
    }
  }

  /** Rebuild the cards: one per symbol, one row per source, in name order. */
  layout() {
    this.layoutDirty = false;
    this.cards = new Map();
    const items = [...this.keys.values()].sort(
      (a, b) => a.symbol.localeCompare(b.symbol) || a.exchange.localeCompare(b.exchange));
    const frag = document.createDocumentFragment();
    for (const item of items) {
      let card = this.cards.get(item.symbol);
      if (!card) {
        card = makeCard(item.symbol);
        this.cards.set(item.symbol, card);
        frag.append(card.el);
      }
      item.row = makeRow(item);
      item.shown = null;
      card.body.append(item.row.tr);
    }
    if (!items.length) {
      const p = document.createElement('p');
      p.className = 'empty';
      p.textContent = 'waiting for prices…';
      frag.append(p);
    }
    this.root.replaceChildren(frag);
    this.onSymbols(this.symbols());
  }
}

function isPrice(e) {
  return e && typeof e.symbol === 'string' && typeof e.exchange === 'string'
    && typeof e.price === 'number' && typeof e.timestamp === 'number' && !('interval' in e);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function makeCard(symbol) {
  const card = el('article', 'card');
  card.dataset.symbol = symbol;
  const head = el('h3', null, symbol);
  const med = el('span', 'median');
  head.append(' ', med);
  const table = el('table', 'quotes');
  const thead = el('thead');
  const tr = el('tr');
  for (const name of ['source', 'price', '1 m', 'spread', 'age']) {
    const th = el('th', null, name);
    th.scope = 'col';
    tr.append(th);
  }
  thead.append(tr);
  const body = el('tbody');
  table.append(thead, body);
  card.append(head, table);
  return { el: card, body, median: med };
}

function makeRow(item) {
  const tr = el('tr');
  tr.dataset.symbol = item.symbol;
  tr.dataset.exchange = item.exchange;
  const name = el('th', 'source', item.exchange);
  name.scope = 'row';
  const cells = {
    tr,
    price: el('td', 'price', '—'),
    change: el('td', 'change', '—'),
    spread: el('td', 'spread', '—'),
    age: el('td', 'age', '—'),
  };
  tr.append(name, cells.price, cells.change, cells.spread, cells.age);
  return cells;
}
