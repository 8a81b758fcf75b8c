// The thread panel: a root message, its replies (every page of them, then
// live ones), and a box to reply. Replies are sent with the root's id as
// `threadId`; the root's reply count in the channel follows.

import { byId, el, plural, stickToBottom } from './dom.js';
import { Timeline } from './timeline.js';

const THREAD_PAGE = 100;
const MAX_THREAD_PAGES = 20;

/** @typedef {import('./channel-view.js').ChannelView} ChannelView */
/** @typedef {import('./timeline.js').Message} Message */

/**
 * @typedef {object} ThreadHost
 * @property {(userId: string) => boolean} isMine
 * @property {() => {userId: string, username: string}} me
 * @property {(text: string, kind?: string) => void} notify
 * @property {(open: boolean) => void} toggled  The panel opened or closed.
 * @property {(text: string) => void} announce
 */

export class ThreadPanel {
  /** @param {ThreadHost} host */
  constructor(host) {
    this.host = host;
    this.panel = byId('thread-panel');
    this.scroller = byId('thread-scroller');
    this.form = /** @type {HTMLFormElement} */ (byId('thread-form'));
    this.input = /** @type {HTMLTextAreaElement} */ (byId('thread-composer'));
    this.channelLabel = byId('thread-channel');
    /** @type {ChannelView | null} */
    this.view = null;
    /** @type {Message | null} */
    this.root = null;
    /** @type {HTMLElement | null} */
    this.trigger = null;
    /** @type {Timeline | null} */
    this.replies = null;
    this.repliesHeading = el('h3', 'replies-heading');
    this.sticky = stickToBottom(this.scroller);
    this.generation = 0;
    byId('close-thread').addEventListener('click', () => this.close());
    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      this.send();
    });
    this.input.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.form.requestSubmit();
      }
    });
  }

  get isOpen() {
    return this.view !== null;
  }

  /**
   * @param {ChannelView} view
   * @param {Message} root
   * @param {HTMLElement} trigger  Gets the focus back on close.
   */
  open(view, root, trigger) {
    this.generation += 1;
    const generation = this.generation;
    this.view = view;
    this.root = root;
    this.trigger = trigger;
    const common = { isMine: this.host.isMine, me: this.host.me, threads: false, notify: this.host.notify };
    const rootList = new Timeline({ ...common, label: 'Thread root' });
    rootList.head.remove();
    rootList.insert([root]);
    rootList.list.classList.add('thread-root');
    this.replies = new Timeline({
      ...common,
      label: `Replies to ${root.username}`,
      dayBefore: root.timestamp,
    });
    this.replies.head.remove();
    this.scroller.replaceChildren(rootList.list, this.repliesHeading, this.replies.list);
    this.sticky.observe(this.replies.list);
    this.channelLabel.textContent = `in #${view.id}`;
    this.panel.dataset.root = root.id;
    this.panel.hidden = false;
    this.renderCount();
    for (const outgoing of view.handle.outgoing) {
      if (outgoing.threadId === root.id) this.replies.showOutgoing(outgoing);
    }
    this.host.toggled(true);
    this.input.value = '';
    this.input.focus();
    void this.loadAll(generation);
  }

  /** @param {number} generation */
  async loadAll(generation) {
    const view = this.view;
    const root = this.root;
    if (!view || !root) return;
    /** @type {number | undefined} */
    let beforeSeq;
    /** @type {number[]} */
    const seqs = [];
    this.scroller.setAttribute('aria-busy', 'true');
    try {
      for (let i = 0; i < MAX_THREAD_PAGES; i += 1) {
        const page = await view.handle.history({ threadId: root.id, limit: THREAD_PAGE, beforeSeq });
        if (generation !== this.generation || !this.replies) return;
        this.keepBottom(() => this.replies?.insert(page.messages));
        for (const m of page.messages) seqs.push(m.seq);
        if (!page.hasMore || page.messages.length === 0) {
          view.knowAllReplies(root.id, seqs);
          break;
        }
        beforeSeq = page.messages[0].seq;
      }
    } catch (err) {
      if (generation === this.generation) {
        this.host.notify(`Could not load the replies: ${err instanceof Error ? err.message : err}`);
      }
    } finally {
      if (generation === this.generation) {
        this.scroller.removeAttribute('aria-busy');
        this.renderCount();
      }
    }
  }

  renderCount() {
    if (!this.view || !this.root) return;
    const count = Math.max(this.view.replyCount(this.root.id), this.replies?.nodes.size ?? 0);
    this.repliesHeading.textContent = count > 0 ? plural(count, 'reply', 'replies') : 'No replies yet';
  }

  /**
   * A reply arrived in a channel.
   * @param {ChannelView} view
   * @param {Message} message
   */
  onMessage(view, message) {
    if (view !== this.view || !this.root || message.threadId !== this.root.id || !this.replies) return;
    this.keepBottom(() => this.replies?.insert([message]));
    this.renderCount();
  }

  /**
   * @param {ChannelView} view
   * @param {any} outgoing
   */
  onOutgoing(view, outgoing) {
    if (view !== this.view || !this.root || outgoing.threadId !== this.root.id || !this.replies) return;
    this.keepBottom(() => this.replies?.showOutgoing(outgoing));
  }

  /** @param {() => void} change */
  keepBottom(change) {
    const s = this.scroller;
    const bottom = s.scrollHeight - s.scrollTop - s.clientHeight < 60;
    change();
    if (bottom) s.scrollTop = s.scrollHeight;
  }

  send() {
    const view = this.view;
    const root = this.root;
    const content = this.input.value;
    if (!view || !root || content.trim() === '') return;
    try {
      view.handle.send(content, { threadId: root.id }).catch(() => {});
    } catch (err) {
      this.host.notify(err instanceof Error ? err.message : String(err));
      return;
    }
    this.input.value = '';
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.input.focus();
  }

  /** @param {{restoreFocus?: boolean}} [options] */
  close(options = {}) {
    if (!this.view) return;
    const trigger = this.trigger;
    this.generation += 1;
    this.view = null;
    this.root = null;
    this.trigger = null;
    this.replies = null;
    this.panel.hidden = true;
    delete this.panel.dataset.root;
    this.scroller.replaceChildren();
    this.host.toggled(false);
    if (options.restoreFocus !== false) {
      const item = trigger?.closest('.msg');
      if (trigger && trigger.isConnected && item instanceof HTMLElement) item.focus();
      else byId('composer').focus();
    }
  }
}
