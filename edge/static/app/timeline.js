// A list of chat messages in seq order: the channel's main timeline, or a
// thread's replies. Messages are keyed by id (each appears once, wherever it
// came from: live, replayed after a reconnect, or a history page); your own
// messages that the server has not confirmed yet are "bubbles" keyed by
// clientMsgId, kept after every confirmed message, showing their delivery
// state. Every message carries its author: one that follows a message of the
// same author within a few minutes hides the header visually only, so the
// grouping is worked out from the neighbours in the list, never remembered
// from whatever came last.

import { avatar, button, dayKey, dayLabel, el, formatTime, plural } from './dom.js';

const GROUP_WINDOW_MS = 5 * 60 * 1000;

/** @typedef {import('../waddle.js').ChatMessage & {replyCount?: number, clientMsgId?: string}} Message */
/** @typedef {import('../waddle/connection.js').OutgoingMessage} OutgoingMessage */

/** What each delivery state says, short and long. */
const DELIVERY = Object.freeze({
  queued: ['Queued', 'Not sent yet: it goes out as soon as the connection is back'],
  sent: ['Sending…', 'Sent; waiting for the server to store it'],
  acked: ['Delivered', 'Stored by the server: everyone in the channel gets it'],
  failed: ['Not sent', 'The server refused this message'],
});

/**
 * @typedef {object} TimelineOptions
 * @property {string} label  Accessible name of the list.
 * @property {(userId: string) => boolean} isMine
 * @property {boolean} threads  Show reply buttons and reply counts.
 * @property {(message: Message, trigger: HTMLElement) => void} [openThread]
 * @property {(id: string) => number} [replyCount]
 * @property {(text: string) => void} [notify]  Report a failure of an action.
 * @property {() => {userId: string, username: string}} [me]  Who writes the bubbles.
 * @property {(item: HTMLElement) => void} [onReachTop]  The keyboard moved to the first message.
 * @property {number} [dayBefore]  Time of what comes before the first row (a
 *   thread's root): no day separator on the first row when of the same day.
 */

export class Timeline {
  /** @param {TimelineOptions} options */
  constructor(options) {
    this.options = options;
    this.list = el('ol', 'messages');
    this.list.setAttribute('aria-label', options.label);
    /** The first item: "Loading earlier messages…", a button, or the start of the channel. */
    this.head = el('li', 'history-status');
    this.list.append(this.head);
    /** @type {Map<string, HTMLElement>} confirmed messages by id */
    this.nodes = new Map();
    /** @type {Map<string, HTMLElement>} bubbles by clientMsgId */
    this.bubbles = new Map();
    /** @type {Set<string>} clientMsgIds whose bubble a confirmed message replaced */
    this.replaced = new Set();
    this.list.addEventListener('keydown', (event) => this.onKeyDown(event));
    this.list.addEventListener('focusin', (event) => {
      const item = /** @type {HTMLElement} */ (event.target).closest?.('.msg');
      if (item instanceof HTMLElement) this.makeCurrent(item);
    });
  }

  /** Lowest seq shown (null when empty). */
  get firstSeq() {
    const first = this.list.querySelector('.msg[data-seq]');
    return first ? Number(/** @type {HTMLElement} */ (first).dataset.seq) : null;
  }

  get size() {
    return this.nodes.size + this.bubbles.size;
  }

  /** @param {string} id */
  has(id) {
    return this.nodes.has(id);
  }

  clear() {
    for (const node of [...this.nodes.values(), ...this.bubbles.values()]) node.remove();
    this.nodes.clear();
    this.bubbles.clear();
    this.replaced.clear();
  }

  /**
   * Insert confirmed messages (any order; ones already shown are skipped).
   * @param {Message[]} messages
   * @returns {HTMLElement[]} the new nodes
   */
  insert(messages) {
    /** @type {Message[]} */
    const fresh = [];
    for (const m of messages) {
      if (!this.nodes.has(m.id)) fresh.push(m);
      else if (this.bubbles.size > 0) this.takeBubbleFor(m); // shown already: drop its bubble
    }
    fresh.sort((a, b) => a.seq - b.seq);
    /** @type {HTMLElement[]} */
    const added = [];
    for (const message of fresh) {
      if (this.nodes.has(message.id)) continue;
      this.takeBubbleFor(message);
      const node = this.render(message);
      this.nodes.set(message.id, node);
      this.list.insertBefore(node, this.insertionPoint(message.seq));
      added.push(node);
    }
    this.decorateAround(added);
    return added;
  }

  /**
   * Where a confirmed message of `seq` goes: before the first confirmed
   * message with a higher seq, else before the first bubble, else last.
   * @param {number} seq
   * @returns {Element | null}
   */
  insertionPoint(seq) {
    /** @type {Element | null} */
    let after = null;
    for (let node = this.list.lastElementChild; node && node !== this.head; node = node.previousElementSibling) {
      const s = /** @type {HTMLElement} */ (node).dataset.seq;
      if (s !== undefined && Number(s) < seq) {
        after = node;
        break;
      }
    }
    // Right after it comes a message with a higher seq, or a bubble, or nothing.
    return after === null ? this.head.nextElementSibling : after.nextElementSibling;
  }

  /**
   * A confirmed message of ours replaces its bubble: by clientMsgId when it
   * carries one, or by the id its ack gave; else (the message came before
   * the ack, which will find its bubble gone) the oldest bubble with the
   * same text that was written.
   * @param {Message} message
   */
  takeBubbleFor(message) {
    if (!this.options.isMine(message.userId)) return;
    let key = typeof message.clientMsgId === 'string' && this.bubbles.has(message.clientMsgId) ? message.clientMsgId : null;
    for (const pass of ['ack', 'text']) {
      if (key !== null) break;
      for (const [clientMsgId, node] of this.bubbles) {
        const same =
          pass === 'ack'
            ? node.dataset.ackId === message.id
            : node.dataset.state === 'sent' && node.dataset.content === message.content;
        if (same) {
          key = clientMsgId;
          break;
        }
      }
    }
    if (key === null) return;
    const node = this.bubbles.get(key);
    this.bubbles.delete(key);
    this.replaced.add(key);
    const next = node?.nextElementSibling;
    node?.remove();
    if (next instanceof HTMLElement) this.decorate(next);
  }

  /**
   * Show the state of one of our messages not confirmed yet.
   * @param {OutgoingMessage} outgoing
   */
  showOutgoing(outgoing) {
    const id = outgoing.clientMsgId;
    const existing = this.bubbles.get(id);
    const done =
      outgoing.discarded ||
      this.replaced.has(id) ||
      (outgoing.state === 'acked' && (outgoing.delivered || (outgoing.ack && this.nodes.has(outgoing.ack.id))));
    if (done) {
      if (existing) {
        this.bubbles.delete(id);
        const next = existing.nextElementSibling;
        existing.remove();
        if (next instanceof HTMLElement) this.decorate(next);
      }
      return;
    }
    const node = existing ?? this.renderBubble(outgoing);
    if (!existing) {
      this.bubbles.set(id, node);
      this.list.append(node);
      this.decorate(node);
    }
    if (outgoing.ack) node.dataset.ackId = outgoing.ack.id;
    this.setDelivery(node, outgoing.state, outgoing);
  }

  /**
   * @param {string} id
   * @param {number} count
   */
  setReplyCount(id, count) {
    const node = this.nodes.get(id);
    if (node) this.renderReplies(node, count);
  }

  // --- rendering ------------------------------------------------------------

  /** @param {Message} message */
  render(message) {
    const mine = this.options.isMine(message.userId);
    const item = this.shell(message.userId, message.username, message.content, message.timestamp, mine);
    item.dataset.id = message.id;
    item.dataset.seq = String(message.seq);
    const time = /** @type {HTMLTimeElement} */ (item.querySelector('time'));
    time.dateTime = new Date(message.timestamp).toISOString();
    time.title = new Date(message.timestamp).toLocaleString();
    if (mine) this.setDelivery(item, 'acked');
    if (this.options.threads) {
      const reply = button('msg-action reply-button', 'Reply', `Reply to ${message.username} in a thread`);
      reply.tabIndex = -1;
      reply.addEventListener('click', () => this.options.openThread?.(message, reply));
      /** @type {HTMLElement} */ (item.querySelector('.actions')).append(reply);
      const replies = button('replies', '');
      replies.hidden = true;
      replies.tabIndex = -1;
      replies.addEventListener('click', () => this.options.openThread?.(message, replies));
      /** @type {HTMLElement} */ (item.querySelector('.msg-body')).append(replies);
      this.renderReplies(item, message.replyCount ?? this.options.replyCount?.(message.id) ?? 0);
      item.setAttribute('aria-keyshortcuts', 'Enter');
    }
    return item;
  }

  /** @param {OutgoingMessage} outgoing */
  renderBubble(outgoing) {
    const me = this.options.me?.() ?? { userId: '', username: 'You' };
    const item = this.shell(me.userId, me.username, outgoing.content, Date.now(), true);
    item.classList.add('pending');
    item.dataset.clientMsgId = outgoing.clientMsgId;
    item.dataset.content = outgoing.content;
    item.dataset.user = me.userId;
    return item;
  }

  /**
   * @param {string} userId
   * @param {string} username
   * @param {string} content
   * @param {number} timestamp
   * @param {boolean} mine
   */
  shell(userId, username, content, timestamp, mine) {
    const item = el('li', `msg${mine ? ' mine' : ''}`);
    item.tabIndex = -1;
    item.dataset.user = userId;
    item.dataset.ts = String(timestamp);
    const divider = el('div', 'day-divider');
    divider.setAttribute('role', 'separator');
    divider.append(el('span', 'day-label', dayLabel(timestamp)));
    divider.hidden = true;
    const row = el('div', 'msg-row');
    const body = el('div', 'msg-body');
    const meta = el('div', 'meta');
    meta.append(el('span', 'author', username));
    if (mine) meta.append(el('span', 'you-tag', '(you)'));
    const time = el('time', 'time', formatTime(timestamp));
    meta.append(time);
    body.append(meta, el('p', 'content', content));
    const actions = el('div', 'actions');
    row.append(avatar(userId, username), body, actions);
    item.append(divider, row);
    return item;
  }

  /**
   * @param {HTMLElement} item
   * @param {string} state
   * @param {OutgoingMessage} [outgoing]
   */
  setDelivery(item, state, outgoing) {
    if (item.dataset.state === state && state !== 'failed') return;
    item.dataset.state = state;
    const [short, long] = DELIVERY[/** @type {keyof typeof DELIVERY} */ (state)] ?? [state, state];
    let badge = /** @type {HTMLElement | null} */ (item.querySelector('.delivery'));
    if (!badge) {
      badge = el('span', 'delivery');
      /** @type {HTMLElement} */ (item.querySelector('.msg-body')).append(badge);
    }
    badge.dataset.state = state;
    badge.title = long;
    const reason = state === 'failed' ? /** @type {any} */ (outgoing?.error)?.message : undefined;
    badge.replaceChildren(el('span', 'delivery-icon'), el('span', 'delivery-text', reason ? `${short}: ${reason}` : short));
    if (state === 'failed' && outgoing) {
      const retry = button('link-button', 'Retry');
      retry.addEventListener('click', () => {
        try {
          outgoing.retry().catch(() => {});
        } catch (err) {
          this.options.notify?.(err instanceof Error ? err.message : String(err));
        }
      });
      const discard = button('link-button', 'Discard');
      discard.addEventListener('click', () => outgoing.discard());
      badge.append(retry, discard);
    }
  }

  /**
   * @param {HTMLElement} item
   * @param {number} count
   */
  renderReplies(item, count) {
    const replies = /** @type {HTMLButtonElement | null} */ (item.querySelector('.replies'));
    if (!replies) return;
    replies.hidden = count <= 0;
    replies.dataset.count = String(count);
    replies.textContent = plural(count, 'reply', 'replies');
    replies.setAttribute('aria-label', `${plural(count, 'reply', 'replies')}: open the thread`);
  }

  // --- grouping and day separators -----------------------------------------

  /** @param {HTMLElement[]} nodes */
  decorateAround(nodes) {
    const touched = new Set(nodes);
    for (const node of nodes) {
      const next = nextMessage(node);
      if (next) touched.add(next);
    }
    for (const node of touched) this.decorate(node);
  }

  /**
   * A message shows a day separator when it is the first of its day, and
   * its author (visibly) unless it follows one of the same author shortly.
   * @param {HTMLElement} node
   */
  decorate(node) {
    if (!node.classList.contains('msg')) return;
    const prev = previousMessage(node);
    const ts = Number(node.dataset.ts);
    const before = prev ? Number(prev.dataset.ts) : this.options.dayBefore;
    const newDay = before === undefined || dayKey(before) !== dayKey(ts);
    const continued =
      !newDay &&
      prev !== null &&
      prev.dataset.user === node.dataset.user &&
      ts - Number(prev.dataset.ts) < GROUP_WINDOW_MS;
    node.classList.toggle('day-start', newDay);
    node.classList.toggle('continued', continued);
    const divider = /** @type {HTMLElement} */ (node.querySelector('.day-divider'));
    divider.hidden = !newDay;
    if (newDay) /** @type {HTMLElement} */ (divider.firstElementChild).textContent = dayLabel(ts);
  }

  /** Day labels say "Today": refresh them after midnight. */
  refreshDays() {
    for (const node of this.list.querySelectorAll('.msg.day-start')) {
      const label = node.querySelector('.day-label');
      if (label) label.textContent = dayLabel(Number(/** @type {HTMLElement} */ (node).dataset.ts));
    }
  }

  // --- keyboard ---------------------------------------------------------------

  /**
   * One message of the list is in the tab order; arrows move between them.
   * @param {HTMLElement} item
   */
  makeCurrent(item) {
    for (const other of this.list.querySelectorAll('.msg[tabindex="0"]')) {
      if (other !== item) /** @type {HTMLElement} */ (other).tabIndex = -1;
    }
    item.tabIndex = 0;
  }

  /** Put the newest message in the tab order (when none is). */
  ensureCurrent() {
    if (this.list.querySelector('.msg[tabindex="0"]')) return;
    const items = this.list.querySelectorAll('.msg');
    const last = /** @type {HTMLElement | undefined} */ (items[items.length - 1]);
    if (last) last.tabIndex = 0;
  }

  /** @param {KeyboardEvent} event */
  onKeyDown(event) {
    const target = /** @type {HTMLElement} */ (event.target);
    if (!target.classList.contains('msg')) return;
    const items = Array.from(this.list.querySelectorAll('.msg'));
    const i = items.indexOf(target);
    /** @type {Element | undefined} */
    let next;
    switch (event.key) {
      case 'ArrowUp':
        next = items[i - 1];
        break;
      case 'ArrowDown':
        next = items[i + 1];
        break;
      case 'Home':
        next = items[0];
        break;
      case 'End':
        next = items[items.length - 1];
        break;
      case 'Enter': {
        const action = /** @type {HTMLElement | null} */ (
          target.querySelector('.replies:not([hidden])') ?? target.querySelector('.reply-button')
        );
        if (action) {
          event.preventDefault();
          action.click();
        }
        return;
      }
      default:
        return;
    }
    event.preventDefault();
    if (next instanceof HTMLElement) {
      this.makeCurrent(next);
      next.focus();
      if (event.key === 'ArrowUp' || event.key === 'Home') this.options.onReachTop?.(next);
    }
  }
}

/** @param {Element} node @returns {HTMLElement | null} */
function previousMessage(node) {
  let prev = node.previousElementSibling;
  while (prev && !prev.classList.contains('msg')) prev = prev.previousElementSibling;
  return /** @type {HTMLElement | null} */ (prev);
}

/** @param {Element} node @returns {HTMLElement | null} */
function nextMessage(node) {
  let next = node.nextElementSibling;
  while (next && !next.classList.contains('msg')) next = next.nextElementSibling;
  return /** @type {HTMLElement | null} */ (next);
}
