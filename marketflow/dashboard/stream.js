// The WebSocket to /ws/prices: reconnects with backoff, resubscribes, watches for silence.

import { backoffMs } from './model.js';

const SILENCE_MS = 5000; // protocol v1 sends a heartbeat after 1 s of quiet: 5 s means gone

export class PriceStream {
  /**
   * onFrame(message) gets every parsed frame; onState(state, detail) gets 'connecting',
   * 'open', 'waiting' (detail: ms until the next attempt) and 'closed'.
   */
  constructor(url, { onFrame, onState, onOpen }) {
    this.url = url;
    this.onFrame = onFrame;
    this.onState = onState;
    this.onOpen = onOpen;
    this.ws = null;
    this.attempt = 0;
    this.nextId = 1;
    this.candles = null; // {symbol, interval}: re-sent after each reconnect
    this.lastSeq = null;
    this.v1 = false; // the server numbers its frames (protocol v1)
    this.lastFrameAt = 0;
    this.watchdog = null;
  }

  start() {
    this.connect();
    this.watchdog = setInterval(() => this.checkSilence(), 1000);
  }

  connect() {
    this.onState('connecting', this.attempt);
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.lastSeq = null;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.lastFrameAt = Date.now();
      this.onState('open');
      this.sendCandles();
      this.onOpen();
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return; // not ours to judge: the server only sends JSON
      }
      this.attempt = 0; // a frame arrived: the backoff starts over
      this.lastFrameAt = Date.now();
      if (typeof message.seq === 'number') {
        this.v1 = true;
        if (this.lastSeq !== null && message.seq !== this.lastSeq + 1) this.resync();
        this.lastSeq = message.seq;
      }
      this.onFrame(message);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      const delay = backoffMs(this.attempt++);
      this.onState('waiting', delay);
      setTimeout(() => this.connect(), delay);
    };
    // onerror is always followed by onclose, which reconnects.
  }

  /** A v1 server that went quiet for 5 s is gone (a half-open TCP connection): start over. */
  checkSilence() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.v1
        && Date.now() - this.lastFrameAt > SILENCE_MS) {
      this.ws.close();
    }
  }

  send(message) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return null;
    const id = this.nextId++;
    this.ws.send(JSON.stringify({ ...message, id }));
    return id;
  }

  /**
   * Follow the forming candles of `symbol` at `interval` (protocol v1). The symbol is named
   * too, which today's servers accept as a subscribe that changes nothing (an "all symbols"
   * subscription already has it), so the message is harmless where candles are unknown.
   */
  followCandles(symbol, interval) {
    const previous = this.candles;
    this.candles = { symbol, interval };
    if (previous && previous.interval !== interval) {
      this.send({ op: 'unsubscribe', candles: [previous.interval] });
    }
    this.sendCandles();
  }

  sendCandles() {
    if (this.candles) {
      this.send({ op: 'subscribe', symbols: [this.candles.symbol], candles: [this.candles.interval] });
    }
  }

  /** A gap in seq: frames were lost, so ask for a fresh snapshot of the whole subscription. */
  resync() {
    this.lastSeq = null;
    this.sendCandles();
  }
}
