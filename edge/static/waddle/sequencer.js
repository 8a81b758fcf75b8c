// Delivery sequencing of one channel: every seq reaches the application
// exactly once and in ascending order, across reconnects, with messages
// that arrive ahead of a gap being replayed held back until it is filled.

import { normalizeMessage, toSeq } from './core.js';

/**
 * @typedef {import('../waddle.js').ChatMessage} ChatMessage
 *
 * @typedef {object} SequencerOptions
 * @property {(message: ChatMessage) => void} deliver  Hands one message to the application.
 * @property {(fn: () => void, ms: number) => any} setTimeout
 * @property {(handle: any) => void} clearTimeout
 * @property {number} syncTimeoutMs  Give up waiting for the end of a replay
 *   after this long and deliver what is held back.
 */

export class Sequencer {
  /** @param {SequencerOptions} options */
  constructor(options) {
    /** @private */ this._deliverFn = options.deliver;
    /** @private */ this._setTimeout = options.setTimeout;
    /** @private */ this._clearTimeout = options.clearTimeout;
    /** @private */ this._syncTimeoutMs = options.syncTimeoutMs;
    /** @type {number | null} highest seq delivered to the application */
    this.lastSeq = null;
    /** A replay (sync, or subscribe with afterSeq) is running. */
    this.syncing = false;
    /** @private @type {Map<number, ChatMessage>} messages held back until the gap before them is filled */
    this._held = new Map();
    /** @private */ this._syncTimer = null;
  }

  /**
   * Start of an `initial_state`: detects a channel whose history went
   * backwards (a wiped development database), after which nothing past our
   * position would ever come, and starts over.
   * @param {unknown} lastSeq  The frame's `lastSeq`.
   * @returns {{first: boolean, reset: boolean}} `first`: nothing was delivered
   *   before, so the frame's messages are delivered even across a gap.
   */
  open(lastSeq) {
    const serverLast = toSeq(lastSeq);
    let reset = false;
    if (this.lastSeq !== null && serverLast !== null && serverLast < this.lastSeq) {
      reset = true;
      this.lastSeq = null;
      this._held.clear();
      this.stop();
    }
    return { first: this.lastSeq === null, reset };
  }

  /**
   * The messages of an `initial_state`, after `open()`.
   * @param {unknown} messages
   * @param {unknown} lastSeq
   * @param {boolean} first
   */
  initial(messages, lastSeq, first) {
    const serverLast = toSeq(lastSeq);
    const sorted = (Array.isArray(messages) ? messages : [])
      .map(normalizeMessage)
      .filter((m) => m !== null)
      .sort((a, b) => a.seq - b.seq);
    for (const message of sorted) this.accept(message, first);
    if (first && serverLast !== null && (this.lastSeq === null || serverLast > this.lastSeq)) {
      this.lastSeq = serverLast;
    }
  }

  /**
   * The exactly-once, in-order filter every message goes through.
   * @param {ChatMessage} message
   * @param {boolean} [direct] deliver even across a gap (first initial_state)
   */
  accept(message, direct = false) {
    const seq = message.seq;
    if (this.lastSeq !== null && seq <= this.lastSeq) return;
    if (this._held.has(seq)) return;
    if (this.lastSeq === null || direct || !this.syncing || seq === this.lastSeq + 1) {
      this._deliver(message);
      this._drainHeld();
    } else {
      // A gap before this seq is being replayed: hold it back.
      this._held.set(seq, message);
    }
  }

  /** A replay starts: hold back what would skip a seq until it ends. */
  beginSync() {
    this.syncing = true;
    this._clearSyncTimer();
    this._syncTimer = this._setTimeout(() => {
      this._syncTimer = null;
      this.finishSync();
    }, this._syncTimeoutMs);
  }

  /** Deliver whatever is held back, in order, gaps or not. */
  finishSync() {
    this.syncing = false;
    this._clearSyncTimer();
    const seqs = Array.from(this._held.keys()).sort((a, b) => a - b);
    for (const seq of seqs) {
      const message = this._held.get(seq);
      this._held.delete(seq);
      if (this.lastSeq === null || seq > this.lastSeq) this._deliver(message);
    }
  }

  /** The connection is gone: no replay is running any more (held messages stay). */
  stop() {
    this.syncing = false;
    this._clearSyncTimer();
  }

  /** @private */
  _deliver(message) {
    this.lastSeq = message.seq;
    this._deliverFn(message);
  }

  /** @private */
  _drainHeld() {
    while (this.lastSeq !== null && this._held.has(this.lastSeq + 1)) {
      const next = this._held.get(this.lastSeq + 1);
      this._held.delete(this.lastSeq + 1);
      this._deliver(next);
    }
  }

  /** @private */
  _clearSyncTimer() {
    if (this._syncTimer !== null) {
      this._clearTimeout(this._syncTimer);
      this._syncTimer = null;
    }
  }
}
