// Feed health and store status from GET /health, polled every 2 s (503 carries the same body).

import { formatAge, formatCount } from './model.js';

const POLL_MS = 2000;

export class HealthPanel {
  constructor({ status, stores, feeds, pipeline, onHealth }) {
    this.status = status;
    this.stores = stores;
    this.feeds = feeds;
    this.pipeline = pipeline;
    this.onHealth = onHealth;
    this.previous = null; // {at, messages: {source: n}} for messages/s
    this.rows = new Map();
  }

  start() {
    const poll = async () => {
      await this.poll();
      setTimeout(poll, POLL_MS);
    };
    poll();
  }

  async poll() {
    let body = null;
    try {
      const response = await fetch('/health', { cache: 'no-store' });
      body = await response.json();
    } catch {
      body = null;
    }
    if (!body || typeof body !== 'object') {
      this.setStatus('unreachable');
      this.previous = null;
      return;
    }
    this.render(body, performance.now());
    this.onHealth(body);
  }

  setStatus(status) {
    this.status.textContent = status;
    this.status.dataset.status = status;
  }

  render(body, at) {
    this.setStatus(String(body.status ?? 'unknown'));
    this.renderStores(body);
    const sources = body.sources && typeof body.sources === 'object' ? body.sources : {};
    const rates = {};
    const messages = {};
    for (const [name, s] of Object.entries(sources)) {
      messages[name] = s.messages;
      const before = this.previous?.messages[name];
      if (before != null && at > this.previous.at && s.messages >= before) {
        rates[name] = (s.messages - before) / ((at - this.previous.at) / 1000);
      }
    }
    this.previous = { at, messages };
    const current = new Set(this.currentSources ?? Object.keys(sources));
    const names = Object.keys(sources).sort(
      (a, b) => Number(current.has(b)) - Number(current.has(a)) || a.localeCompare(b));
    const seen = new Set();
    for (const name of names) {
      seen.add(name);
      const s = sources[name];
      let row = this.rows.get(name);
      if (!row) {
        row = makeRow(name);
        this.rows.set(name, row);
      }
      this.feeds.append(row.tr); // keeps the order of `names`
      row.tr.dataset.current = String(current.has(name));
      row.status.textContent = s.status;
      row.status.dataset.status = s.status;
      row.rate.textContent = rates[name] == null ? '—' : rates[name].toFixed(rates[name] < 10 ? 1 : 0);
      const reasons = Object.entries(s.rejected_by_reason ?? {}).filter(([, n]) => n > 0);
      row.rejects.textContent = formatCount(s.rejected ?? 0);
      row.rejects.title = reasons.length ? reasons.map(([r, n]) => `${r}: ${n}`).join(', ') : 'none';
      row.reasons.textContent = reasons.map(([r, n]) => `${r} ${formatCount(n)}`).join(' · ');
      row.reconnects.textContent = formatCount(s.reconnects ?? 0);
      row.age.textContent = formatAge(s.last_message_age_ms);
    }
    for (const [name, row] of [...this.rows]) {
      if (!seen.has(name)) { row.tr.remove(); this.rows.delete(name); }
    }
    const p = body.pipeline ?? {};
    const parts = [
      `queue ${formatCount(p.queue_depth)}`,
      `updates ${formatCount(p.updates_total)}`,
      `pending rows ${formatCount(p.pending_rows)}`,
      `late ${formatCount(p.late)}`,
    ];
    if (body.uptime_s != null) parts.push(`up ${formatAge(body.uptime_s * 1000)}`);
    if (body.role) parts.push(`role ${body.role}`);
    if (body.version) parts.push(`v${body.version}`);
    this.pipeline.textContent = parts.join(' · ');
  }

  renderStores(body) {
    const items = [];
    for (const [label, key] of [['PostgreSQL', 'postgres'], ['Redis', 'redis'], ['ingest', 'ingest']]) {
      const store = body[key];
      if (!store || typeof store !== 'object') continue;
      const item = document.createElement('p');
      item.className = 'store';
      item.dataset.store = key;
      item.dataset.status = store.status;
      const name = document.createElement('strong');
      name.textContent = label;
      item.append(name, ` ${store.status}`);
      if (store.latency_ms != null) item.append(` · ${Number(store.latency_ms).toFixed(1)} ms`);
      if (store.age_ms != null) item.append(` · ${formatAge(store.age_ms)} ago`);
      if (store.error) {
        const error = document.createElement('span');
        error.className = 'error';
        error.textContent = ` · ${store.error}`;
        item.append(error);
      }
      items.push(item);
    }
    this.stores.replaceChildren(...items);
  }
}

function makeRow(name) {
  const tr = document.createElement('tr');
  tr.dataset.source = name;
  const th = document.createElement('th');
  th.scope = 'row';
  th.textContent = name;
  const cell = (className) => {
    const td = document.createElement('td');
    if (className) td.className = className;
    return td;
  };
  const row = {
    tr, status: cell('feed-status'), rate: cell('num'), rejects: cell('num'),
    reconnects: cell('num'), age: cell('num'), reasons: document.createElement('small'),
  };
  row.reasons.className = 'reasons';
  const rejectsCell = row.rejects;
  row.rejects = document.createElement('span');
  rejectsCell.append(row.rejects, row.reasons);
  tr.append(th, row.status, row.rate, rejectsCell, row.reconnects, row.age);
  return row;
}
