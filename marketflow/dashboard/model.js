// Pure helpers of the dashboard: numbers and formats, no DOM and no I/O.

export const MINUTE_MS = 60_000;

/** Median of a non-empty list of numbers (mean of the middle two for an even count). */
export function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/**
 * The last price of each second a key had, over a little more than a minute: enough to say
 * what the price was one minute before the newest tick.
 */
export class PriceHistory {
  constructor() {
    this.samples = []; // [{t, p}] oldest first, one per second (the last price of that second)
  }

  add(t, p) {
    const last = this.samples[this.samples.length - 1];
    if (last && Math.floor(last.t / 1000) === Math.floor(t / 1000)) {
      if (t >= last.t) { last.t = t; last.p = p; }
    } else if (!last || t > last.t) {
      this.samples.push({ t, p });
    }
    // Keep one sample at or before "newest - 1 minute", drop the older ones.
    const target = t - MINUTE_MS;
    while (this.samples.length > 1 && this.samples[1].t <= target) this.samples.shift();
  }

  /** Seed the price at time t (from a stored candle) when the history does not reach back. */
  seed(t, p) {
    if (!this.samples.length || this.samples[0].t > t) this.samples.unshift({ t, p });
  }

  /** The price as of `at` (the last sample at or before it), or null if the history is newer. */
  priceAt(at) {
    let found = null;
    for (const s of this.samples) {
      if (s.t > at) break;
      found = s.p;
    }
    return found;
  }

  reaches(at) {
    return this.samples.length > 0 && this.samples[0].t <= at;
  }
}

/** Relative change of `now` against `before`, or null when there is no reference. */
export function change(now, before) {
  return before ? now / before - 1 : null;
}

const priceFormats = new Map();

/** A price with as many decimals as its size needs (2 for BTC, 5 for DOGE). */
export function formatPrice(p) {
  if (p == null || !Number.isFinite(p)) return '—';
  const abs = Math.abs(p);
  const digits = abs >= 1000 ? 2 : abs >= 100 ? 3 : abs >= 1 ? 4 : abs >= 0.01 ? 5 : 8;
  let fmt = priceFormats.get(digits);
  if (!fmt) {
    fmt = new Intl.NumberFormat('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
    priceFormats.set(digits, fmt);
  }
  return fmt.format(p);
}

export function formatPercent(x) {
  if (x == null || !Number.isFinite(x)) return '—';
  const pct = x * 100;
  return `${pct >= 0 ? '+' : '−'}${Math.abs(pct).toFixed(2)}%`;
}

/** A relative difference in basis points (1 bp = 0.01 %). */
export function formatBp(x) {
  if (x == null || !Number.isFinite(x)) return '—';
  const bp = x * 10_000;
  const size = Math.abs(bp);
  return `${bp >= 0 ? '+' : '−'}${size.toFixed(size >= 100 ? 0 : 1)} bp`;
}

export function formatAge(ms) {
  if (ms == null || !Number.isFinite(ms)) return '—';
  const s = Math.max(0, ms) / 1000;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}

export function formatCount(n) {
  return n == null ? '—' : new Intl.NumberFormat('en-US').format(n);
}

/** Reconnect delay after `attempt` failures: 0.5 s doubling to `capMs`, with jitter (50–100 %). */
export function backoffMs(attempt, capMs = 8000, random = Math.random) {
  const base = Math.min(capMs, 500 * 2 ** attempt);
  return Math.round(base * (0.5 + random() / 2));
}

/** Sign of a price move: 1 up, -1 down, 0 unchanged or unknown. */
export function direction(now, before) {
  if (before == null || now === before) return 0;
  return now > before ? 1 : -1;
}

/**
 * Calls `fn` at most once per `minMs`, on an animation frame (so hidden tabs draw nothing).
 * Returns a function that asks for a call.
 */
export function throttled(fn, minMs) {
  let pending = false;
  let last = 0;
  return () => {
    if (pending) return;
    pending = true;
    const wait = Math.max(0, last + minMs - performance.now());
    setTimeout(() => requestAnimationFrame(() => {
      pending = false;
      last = performance.now();
      fn();
    }), wait);
  };
}
