// The data mode: GET /mode, and POST /mode/{test,live} with the admin token when the server
// asks for one (401). The token stays in this tab (sessionStorage), never in a cookie.

const TOKEN_KEY = 'marketflow.adminToken';

export class ModeControl {
  constructor({ name, button, message, dialog, form, input, why, cancel, onMode }) {
    Object.assign(this, { name, button, message, dialog, form, input, why, cancel, onMode });
    this.mode = null;
    this.sources = [];
    this.busy = false;
    this.pending = null;
    button.addEventListener('click', () => this.switchMode());
    cancel.addEventListener('click', () => this.dialog.close('cancel'));
  }

  /** GET /mode; calls made while one is in flight share it. */
  refresh() {
    this.pending ??= this.fetchMode().finally(() => { this.pending = null; });
    return this.pending;
  }

  async fetchMode() {
    try {
      const response = await fetch('/mode', { cache: 'no-store' });
      if (!response.ok) return;
      const body = await response.json();
      this.set(body.mode, body.sources);
    } catch {
      // unreachable: the connection status says so; the next health poll tries again
    }
  }

  /** The mode as the server reports it (GET /mode, POST /mode/*, or /health). */
  set(mode, sources) {
    const changed = mode !== this.mode || (sources && sources.join() !== this.sources.join());
    this.mode = mode;
    if (sources) this.sources = [...sources];
    this.name.textContent = mode;
    this.name.dataset.mode = mode;
    this.button.disabled = this.busy;
    this.button.textContent = `switch to ${this.other()}`;
    if (changed && sources) this.onMode(mode, this.sources);
  }

  other() {
    return this.mode === 'live' ? 'test' : 'live';
  }

  async switchMode() {
    if (this.busy || !this.mode) return;
    const target = this.other();
    this.busy = true;
    this.button.disabled = true;
    this.say(`switching to ${target}…`);
    try {
      let token = sessionStorage.getItem(TOKEN_KEY);
      for (;;) {
        const headers = token ? { Authorization: `Bearer ${token}` } : {};
        const response = await fetch(`/mode/${target}`, { method: 'POST', headers });
        if (response.status === 401) {
          sessionStorage.removeItem(TOKEN_KEY);
          token = await this.askToken(token ? 'That token was refused. Try again:'
            : 'Switching the mode needs the admin token. It is kept in this tab only.');
          if (!token) { this.say('not switched'); return; }
          continue;
        }
        const body = await response.json().catch(() => ({}));
        if (!response.ok) {
          this.say(`not switched: ${body.error ?? `HTTP ${response.status}`}`);
          return;
        }
        if (token) sessionStorage.setItem(TOKEN_KEY, token);
        this.say(body.changed ? `switched to ${body.mode}` : `already ${body.mode}`);
        this.busy = false;
        this.set(body.mode, body.sources);
        return;
      }
    } catch {
      this.say('not switched: server unreachable');
    } finally {
      this.busy = false;
      this.button.disabled = false;
    }
  }

  /** Ask for the token in a modal dialog; resolves to the token, or null when cancelled. */
  askToken(why) {
    this.why.textContent = why;
    this.input.value = '';
    return new Promise((resolve) => {
      const onSubmit = (event) => {
        event.preventDefault();
        const value = this.input.value.trim();
        if (!value) return;
        done(value);
      };
      const onClose = () => done(null);
      const done = (value) => {
        this.form.removeEventListener('submit', onSubmit);
        this.dialog.removeEventListener('close', onClose);
        if (this.dialog.open) this.dialog.close();
        resolve(value);
      };
      this.form.addEventListener('submit', onSubmit);
      this.dialog.addEventListener('close', onClose);
      this.dialog.showModal();
      this.input.focus();
    });
  }

  say(text) {
    this.message.textContent = text;
  }
}
