// One joined channel as the page shows it: its sidebar entry with the
// unread count, its timeline (kept while another channel is shown, so
// switching is instant and keeps the scroll position), paging back through
// history, reply counts of thread roots, who is typing.

import { button, el, plural } from './dom.js';
import { Timeline } from './timeline.js';

const PAGE_SIZE = 50;
const TYPING_EXPIRE_MS = 8000; // forget a typist not heard from for this long

/** @typedef {import('../waddle/connection.js').WaddleChannel} WaddleChannel */
/** @typedef {import('./timeline.js').Message} Message */

/**
 * @typedef {object} ChannelHost  What a channel needs from the page.
 * @property {(userId: string) => boolean} isMine
 * @property {() => {userId: string, username: string}} me
 * @property {(view: ChannelView) => boolean} isActive
 * @property {(view: ChannelView) => void} select
 * @property {(view: ChannelView) => void} leave
 * @property {(view: ChannelView, message: Message, trigger: HTMLElement) => void} openThread
 * @property {(view: ChannelView, message: Message) => void} threadMessage
 * @property {(view: ChannelView, outgoing: any) => void} threadOutgoing
 * @property {(view: ChannelView, reason: string) => void} failed
 * @property {(view: ChannelView) => void} changed  Header, members or typing of this channel changed.
 * @property {() => void} unreadChanged
 * @property {(text: string) => void} announce
 * @property {(text: string, kind?: string) => void} notify
 * @property {() => HTMLElement} scroller
 */

export class ChannelView {
  /**
   * @param {ChannelHost} host
   * @param {WaddleChannel} handle
   */
  constructor(host, handle) {
    this.host = host;
    this.handle = handle;
    this.id = handle.id;
    this.timeline = new Timeline({
      label: `Messages in #${this.id}`,
      isMine: host.isMine,
      me: host.me,
      threads: true,
      openThread: (message, trigger) => host.openThread(this, message, trigger),
      replyCount: (id) => this.replyCount(id),
      notify: host.notify,
      onReachTop: () => void this.loadOlder(),
    });
    /** Lowest seq received (history pages and live alike); null before any. */
    this.oldestSeq = /** @type {number | null} */ (null);
    /** Whether older messages exist (null: not known yet). */
    this.hasMore = /** @type {boolean | null} */ (null);
    this.loadingOlder = false;
    this.historyFailed = false;
    this.firstPageAsked = false;
    /** Saved scroll position while another channel is shown (null: at the bottom). */
    this.savedScroll = /** @type {number | null} */ (null);
    /** Messages are being delivered in a burst (initial state, replay): not announced. */
    this.quiet = true;
    this.unread = 0;
    /**
     * Messages from others that arrived while not seen, counted here for
     * when the server could not say where this user's read cursor is
     * (`unreadCount` null): the badge still moves.
     */
    this.unseen = 0;
    /** @type {Map<string, {username: string, timer: ReturnType<typeof setTimeout>}>} */
    this.typists = new Map();
    /**
     * Reply counts of thread roots: the count a history page gave (`base`, as
     * of seq `baseSeq`) plus the replies seen after it.
     * @type {Map<string, {base: number, baseSeq: number, seqs: Set<number>}>}
     */
    this.replies = new Map();
    /** @type {Array<() => void>} */
    this.offs = [];
    this.item = this.renderItem();
    this.renderHead();
    this.listen();
  }

  get state() {
    return this.handle.state;
  }

  // --- sidebar entry ----------------------------------------------------------

  renderItem() {
    const item = el('li', 'channel-item');
    item.dataset.channel = this.id;
    const link = button('channel-link', '');
    link.append(el('span', 'hash', '#'), el('span', 'channel-name', this.id));
    const badge = el('span', 'badge');
    badge.hidden = true;
    link.append(badge);
    link.addEventListener('click', () => this.host.select(this));
    const leave = button('icon-button leave-button', '×', `Leave #${this.id}`);
    leave.addEventListener('click', () => this.host.leave(this));
    item.append(link, leave);
    this.item = item;
    this.link = link;
    this.badge = badge;
    this.updateItem();
    return item;
  }

  updateItem() {
    const count = this.unread;
    this.badge.hidden = count <= 0;
    this.badge.textContent = count > 99 ? '99+' : String(count);
    this.badge.dataset.count = String(count);
    this.item.classList.toggle('has-unread', count > 0);
    this.item.dataset.state = this.state;
    const parts = [`#${this.id}`];
    if (count > 0) parts.push(plural(count, 'unread message', 'unread messages'));
    if (this.state === 'subscribing') parts.push('joining');
    this.link.setAttribute('aria-label', parts.join(', '));
  }

  // --- events of the channel -----------------------------------------------------

  listen() {
    const h = this.handle;
    this.offs.push(
      h.on('initialState', () => {
        this.quiet = true;
      }),
      h.on('state', (change) => this.onState(change)),
      h.on('message', (message) => this.onMessage(message)),
      h.on('syncComplete', (frame) => {
        this.quiet = false;
        const count = Number(frame.count) || 0;
        if (count > 0 && this.host.isActive(this)) {
          this.host.announce(`${plural(count, 'message', 'messages')} arrived while you were disconnected`);
        }
      }),
      h.on('outgoing', (outgoing) => {
        if (outgoing.threadId) {
          this.host.threadOutgoing(this, outgoing);
          return;
        }
        const stick = this.host.isActive(this);
        this.preserveScroll(() => this.timeline.showOutgoing(outgoing), stick && outgoing.state === 'queued');
      }),
      h.on('unread', ({ unreadCount }) => {
        if (unreadCount !== null && unreadCount !== undefined) this.unseen = 0;
        this.setUnread(unreadCount ?? this.unseen);
      }),
      h.on('online', () => this.host.changed(this)),
      h.on('typing', (frame) => this.onTyping(frame)),
      h.on('error', (err) => {
        if (err.code === 'history_reset') {
          this.timeline.clear();
          this.replies.clear();
          this.oldestSeq = null;
          this.hasMore = null;
          this.renderHead();
          this.host.notify(`The history of #${this.id} was reset on the server.`);
        }
      }),
    );
  }

  /** @param {any} change */
  onState(change) {
    this.updateItem();
    if (change.state === 'live') {
      // The initial state (or a resume's) has been delivered; a resume's
      // missed messages follow until sync_complete.
      this.quiet = this.handle.lastSeq !== null && change.previous === 'resuming';
      if (this.handle.lastSeq === 0) {
        this.hasMore = false; // an empty channel
        this.renderHead();
      }
      if (!this.firstPageAsked) {
        this.firstPageAsked = true;
        void this.loadNewest();
      }
      if (this.host.isActive(this)) this.markReadIfSeen();
    } else if (change.state === 'failed') {
      const reason = change.error?.message ?? 'refused';
      this.host.failed(this, reason);
    }
    this.host.changed(this);
  }

  /** @param {number} count */
  setUnread(count) {
    if (count === this.unread) return;
    this.unread = count;
    this.updateItem();
    this.host.unreadChanged();
  }

  /** @param {Message} message */
  onMessage(message) {
    this.noteSeq(message.seq);
    if (!this.quiet && !this.host.isMine(message.userId) && this.handle.unreadCount === null) {
      this.unseen += 1;
      this.setUnread(this.unseen);
    }
    this.stopTyping(message.userId);
    if (message.threadId) {
      this.countReply(message.threadId, message.seq);
      this.host.threadMessage(this, message);
    } else {
      const active = this.host.isActive(this);
      const bottom = active && this.atBottom();
      this.preserveScroll(() => this.timeline.insert([message]), bottom || (active && this.host.isMine(message.userId)));
      if (active && !bottom && !this.host.isMine(message.userId)) this.host.changed(this);
    }
    if (this.host.isActive(this)) {
      if (!this.quiet && !this.host.isMine(message.userId)) {
        const where = message.threadId ? ' (in a thread)' : '';
        this.host.announce(`${message.username}${where}: ${message.content}`);
      }
      this.markReadIfSeen();
    }
  }

  /** @param {any} frame */
  onTyping(frame) {
    if (this.host.isMine(frame.userId)) return;
    const before = this.typists.get(frame.userId);
    if (before) clearTimeout(before.timer);
    if (frame.isTyping) {
      const timer = setTimeout(() => this.stopTyping(frame.userId), TYPING_EXPIRE_MS);
      this.typists.set(frame.userId, { username: String(frame.username ?? ''), timer });
    } else {
      this.typists.delete(frame.userId);
    }
    this.host.changed(this);
  }

  /** @param {string} userId */
  stopTyping(userId) {
    const typist = this.typists.get(userId);
    if (!typist) return;
    clearTimeout(typist.timer);
    this.typists.delete(userId);
    this.host.changed(this);
  }

  /** @returns {string[]} names of who is typing */
  typingNames() {
    return Array.from(this.typists.values(), (t) => t.username).sort((a, b) => a.localeCompare(b));
  }

  // --- reading --------------------------------------------------------------------

  /** The newest message is on screen (and the page is looked at): it is read. */
  markReadIfSeen() {
    if (document.visibilityState !== 'visible' || !this.atBottom()) return;
    // The handle's count, not this.unread: the `unread` event of a message
    // comes after its `message` event. An unknown cursor (null) is set
    // here, so the count is known from now on.
    const unread = this.handle.unreadCount;
    if (unread === null ? (this.handle.lastSeq ?? 0) > 0 : unread > 0) this.handle.markRead();
    if (this.unseen > 0) {
      this.unseen = 0;
      this.setUnread(this.handle.unreadCount ?? 0);
    }
  }

  atBottom() {
    if (!this.host.isActive(this)) return this.savedScroll === null;
    const s = this.host.scroller();
    return s.scrollHeight - s.scrollTop - s.clientHeight < 60;
  }

  /**
   * Change the list without moving what the reader looks at: stay at the
   * bottom when `stick`, else keep the distance from the bottom when rows
   * are added above the view (history), or the scroll position otherwise.
   * @param {() => unknown} change
   * @param {boolean} stick
   */
  preserveScroll(change, stick) {
    if (!this.host.isActive(this)) {
      change();
      return;
    }
    const s = this.host.scroller();
    const fromBottom = s.scrollHeight - s.scrollTop;
    const wasBottom = this.atBottom();
    change();
    if (stick || wasBottom) s.scrollTop = s.scrollHeight;
    else s.scrollTop = s.scrollHeight - fromBottom;
  }

  // --- history -----------------------------------------------------------------------

  /** @param {number} seq */
  noteSeq(seq) {
    if (this.oldestSeq === null || seq < this.oldestSeq) {
      this.oldestSeq = seq;
      if (seq <= 1) this.hasMore = false;
      this.renderHead();
    }
  }

  /** The newest page: the reply counts of the roots the initial state showed. */
  async loadNewest() {
    try {
      const page = await this.handle.history({ limit: PAGE_SIZE });
      const last = page.messages[page.messages.length - 1];
      this.applyPage(page, last ? last.seq : 0);
    } catch {
      // Reply counts then only count what arrives live; paging still works.
      return;
    }
    this.fillView();
  }

  /** Load the page before the oldest message shown. */
  async loadOlder() {
    if (this.loadingOlder || this.hasMore === false || this.oldestSeq === null) return;
    if (this.state !== 'live' && this.state !== 'resuming') return;
    this.loadingOlder = true;
    this.historyFailed = false;
    this.renderHead();
    try {
      const page = await this.handle.history({ beforeSeq: this.oldestSeq, limit: PAGE_SIZE });
      this.applyPage(page, this.handle.lastSeq ?? 0);
      if (!page.hasMore) this.hasMore = false;
    } catch {
      this.historyFailed = true;
    } finally {
      this.loadingOlder = false;
      this.renderHead();
    }
    // Keep going while the view is not filled (replies do not show here).
    if (!this.historyFailed && this.host.isActive(this)) this.fillView();
  }

  /** Load older pages while the list does not fill the view or sits at its top. */
  fillView() {
    if (!this.host.isActive(this) || this.hasMore === false) return;
    const s = this.host.scroller();
    if (s.scrollHeight <= s.clientHeight + 40 || s.scrollTop < 300) void this.loadOlder();
  }

  /**
   * @param {{messages: Message[], hasMore: boolean}} page
   * @param {number} asOf  Reply counts in the page include replies up to this seq.
   */
  applyPage(page, asOf) {
    /** @type {Message[]} */
    const roots = [];
    for (const message of page.messages) {
      if (message.threadId) {
        this.addReplySeq(message.threadId, message.seq);
      } else {
        roots.push(message);
        const r = this.replyEntry(message.id);
        r.base = message.replyCount ?? 0;
        r.baseSeq = Math.max(asOf, message.seq);
      }
    }
    const first = page.messages[0];
    if (first && (this.oldestSeq === null || first.seq <= this.oldestSeq)) {
      this.oldestSeq = first.seq;
      this.hasMore = page.hasMore;
    }
    const active = this.host.isActive(this);
    this.preserveScroll(() => {
      this.timeline.insert(roots);
      for (const root of roots) this.timeline.setReplyCount(root.id, this.replyCount(root.id));
    }, active && this.atBottom());
    this.renderHead();
  }

  renderHead() {
    const head = this.timeline.head;
    if (this.loadingOlder) {
      head.replaceChildren(el('span', 'history-note', 'Loading earlier messages…'));
      head.dataset.state = 'loading';
    } else if (this.hasMore === false || (this.oldestSeq !== null && this.oldestSeq <= 1)) {
      head.replaceChildren(el('span', 'history-note', `This is the beginning of #${this.id}.`));
      head.dataset.state = 'start';
    } else if (this.oldestSeq === null) {
      head.replaceChildren();
      head.dataset.state = 'empty';
    } else {
      const more = button('link-button load-older', this.historyFailed ? 'Could not load earlier messages: try again' : 'Load earlier messages');
      more.addEventListener('click', () => void this.loadOlder());
      head.replaceChildren(more);
      head.dataset.state = 'more';
    }
  }

  // --- threads ---------------------------------------------------------------------------

  /** @param {string} id */
  replyEntry(id) {
    let entry = this.replies.get(id);
    if (!entry) {
      entry = { base: 0, baseSeq: 0, seqs: new Set() };
      this.replies.set(id, entry);
    }
    return entry;
  }

  /** @param {string} rootId @param {number} seq */
  addReplySeq(rootId, seq) {
    this.replyEntry(rootId).seqs.add(seq);
  }

  /** A reply arrived live. @param {string} rootId @param {number} seq */
  countReply(rootId, seq) {
    this.addReplySeq(rootId, seq);
    this.timeline.setReplyCount(rootId, this.replyCount(rootId));
  }

  /**
   * Every reply of a thread is known (the thread panel loaded them all): the
   * count is exactly the replies seen.
   * @param {string} rootId
   * @param {number[]} seqs
   */
  knowAllReplies(rootId, seqs) {
    const entry = this.replyEntry(rootId);
    for (const seq of seqs) entry.seqs.add(seq);
    entry.base = 0;
    entry.baseSeq = 0;
    this.timeline.setReplyCount(rootId, this.replyCount(rootId));
  }

  /** @param {string} id */
  replyCount(id) {
    const entry = this.replies.get(id);
    if (!entry) return 0;
    let n = entry.base;
    for (const seq of entry.seqs) if (seq > entry.baseSeq) n += 1;
    return n;
  }

  // --- end -----------------------------------------------------------------------------------

  dispose() {
    for (const off of this.offs) off();
    this.offs = [];
    for (const typist of this.typists.values()) clearTimeout(typist.timer);
    this.typists.clear();
    this.item.remove();
  }
}
