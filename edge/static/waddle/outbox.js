// The outbox: chat messages sent and not yet acknowledged, in send order.
// Each one keeps its clientMsgId (the server's idempotency key) until its
// ack, is written again on every new connection, and waits out the pause a
// retryable refusal asked for. A window bounds how many are written and
// unanswered at once, so a reconnect's backlog does not arrive as one burst
// that the server's rate limit would refuse.

/**
 * @typedef {object} OutboxEntry
 * @property {string} clientMsgId
 * @property {string} content
 * @property {string | undefined} threadId
 * @property {string} frame    The frame as written on the wire.
 * @property {number} sentOn   Id of the connection it was last written on (0: not written since).
 * @property {boolean} held    Waiting out a pause the server asked for.
 *
 * @typedef {object} OutboxOptions
 * @property {(fn: () => void, ms: number) => any} setTimeout
 * @property {(handle: any) => void} clearTimeout
 * @property {() => void} onRelease  A pause is over: write again what may go.
 * @property {(entry: OutboxEntry, written: boolean) => void} [onChange]  An entry
 *   was written (true) or is waiting to be written again (false).
 */

export class Outbox {
  /** @param {OutboxOptions} options */
  constructor(options) {
    /** @private */ this._setTimeout = options.setTimeout;
    /** @private */ this._clearTimeout = options.clearTimeout;
    /** @private */ this._onRelease = options.onRelease;
    /** @private */ this._onChange = options.onChange ?? (() => {});
    /** @type {Map<string, OutboxEntry>} */
    this.entries = new Map();
    /** @private */ this._resendTimer = null;
  }

  get size() {
    return this.entries.size;
  }

  /** @param {OutboxEntry} entry */
  add(entry) {
    this.entries.set(entry.clientMsgId, entry);
  }

  /** @param {string} clientMsgId */
  get(clientMsgId) {
    return this.entries.get(clientMsgId);
  }

  /**
   * Remove an entry (acknowledged, or refused for good).
   * @param {string} clientMsgId
   * @returns {OutboxEntry | undefined}
   */
  take(clientMsgId) {
    const entry = this.entries.get(clientMsgId);
    if (entry !== undefined) this.entries.delete(clientMsgId);
    return entry;
  }

  /**
   * How many entries were written on connection `connId` and are unanswered.
   * @param {number} connId
   */
  inFlight(connId) {
    let n = 0;
    for (const entry of this.entries.values()) if (entry.sentOn === connId) n += 1;
    return n;
  }

  /**
   * Write entries not yet written on `connId`, in send order, at most `room`
   * of them; stop at one that waits out a pause (keeps the order).
   * @param {number} connId
   * @param {number} room
   * @param {(frame: string) => void} write
   * @returns {number} How many were written.
   */
  pump(connId, room, write) {
    let written = 0;
    for (const entry of this.entries.values()) {
      if (written >= room) break;
      if (entry.sentOn === connId) continue;
      if (entry.held) break;
      write(entry.frame);
      entry.sentOn = connId;
      written += 1;
      this._onChange(entry, true);
    }
    return written;
  }

  /**
   * Resend one refused entry (or, when the server did not say which, every
   * pending one: the server deduplicates by clientMsgId) after `delayMs`.
   * @param {string | undefined} clientMsgId
   * @param {number} delayMs
   */
  hold(clientMsgId, delayMs) {
    for (const entry of this.entries.values()) {
      if (clientMsgId === undefined || entry.clientMsgId === clientMsgId) {
        entry.held = true;
        const wasWritten = entry.sentOn !== 0;
        entry.sentOn = 0;
        if (wasWritten) this._onChange(entry, false);
      }
    }
    if (this._resendTimer !== null) return;
    this._resendTimer = this._setTimeout(() => {
      this._resendTimer = null;
      for (const entry of this.entries.values()) entry.held = false;
      this._onRelease(); // a reconnect in the meantime resent them already
    }, delayMs);
  }

  /** The connection is gone: every entry waits for the next one, no pause pending. */
  detach() {
    if (this._resendTimer !== null) {
      this._clearTimeout(this._resendTimer);
      this._resendTimer = null;
    }
    for (const entry of this.entries.values()) {
      entry.held = false;
      if (entry.sentOn !== 0) {
        entry.sentOn = 0;
        this._onChange(entry, false);
      }
    }
  }
}
