// The chat page: sign-in, one WaddleConnection (protocol v1.1) for every
// joined channel, the channel sidebar, the conversation, the thread panel,
// the member list and the connection banner. No framework and no build
// step; runs under the edge's strict Content-Security-Policy (no inline
// script or style).

import { CHANNEL_ID, WaddleConnection } from '../waddle.js';
import { ChannelView } from './channel-view.js';
import { STATUS_LABELS, avatar, byId, button, el, hueClass, listNames, plural, stickToBottom } from './dom.js';
import { DevTokens, TokenError, fetchDevToken, jwtIdentity } from './tokens.js';
import { ThreadPanel } from './thread.js';

const TYPING_IDLE_MS = 5000; // stop "typing" after this much idle time
const NOTICE_TTL_MS = 10_000;
const QUICK_RETRY_EVERY_MS = 30_000; // a refused development token is replaced at once this often
const SESSION_KEY = 'waddle.session';
const THEME_KEY = 'waddle.theme';
const STATUS_ORDER = { online: 0, away: 1, dnd: 2 };

const wide = window.matchMedia('(min-width: 1100px)');
const sticky = stickToBottom(byId('scroller'));

/** @typedef {import('./channel-view.js').Message} Message */
/** @typedef {{mode: 'name', grant: import('./tokens.js').DevGrant} | {mode: 'token', token: string}} Credentials */

const ui = {
  signin: byId('signin'),
  signinForm: /** @type {HTMLFormElement} */ (byId('signin-form')),
  nameField: byId('name-field'),
  tokenField: byId('token-field'),
  name: /** @type {HTMLInputElement} */ (byId('name')),
  token: /** @type {HTMLTextAreaElement} */ (byId('token')),
  channel: /** @type {HTMLInputElement} */ (byId('channel')),
  signinError: byId('signin-error'),
  signinButton: /** @type {HTMLButtonElement} */ (byId('sign-in')),
  app: byId('app'),
  sidebar: byId('sidebar'),
  channelList: byId('channel-list'),
  joinForm: /** @type {HTMLFormElement} */ (byId('join-channel-form')),
  joinInput: /** @type {HTMLInputElement} */ (byId('join-channel-input')),
  joinError: byId('join-channel-error'),
  meAvatar: byId('me-avatar'),
  meName: byId('me-name'),
  presence: /** @type {HTMLSelectElement} */ (byId('presence')),
  theme: /** @type {HTMLSelectElement} */ (byId('theme')),
  signOut: byId('sign-out'),
  openSidebar: byId('open-sidebar'),
  closeSidebar: byId('close-sidebar'),
  menuBadge: byId('menu-badge'),
  title: byId('channel-title'),
  meta: byId('channel-meta'),
  connState: byId('conn-state'),
  toggleMembers: byId('toggle-members'),
  membersButtonCount: byId('members-button-count'),
  banner: byId('banner'),
  connAnnouncer: byId('conn-announcer'),
  bannerText: byId('banner-text'),
  retryNow: /** @type {HTMLButtonElement} */ (byId('retry-now')),
  tokenForm: /** @type {HTMLFormElement} */ (byId('token-form')),
  newToken: /** @type {HTMLTextAreaElement} */ (byId('new-token')),
  notices: byId('notices'),
  scroller: byId('scroller'),
  jumpLatest: byId('jump-latest'),
  typing: byId('typing'),
  composerForm: /** @type {HTMLFormElement} */ (byId('composer-form')),
  composer: /** @type {HTMLTextAreaElement} */ (byId('composer')),
  composerLabel: byId('composer-label'),
  composerError: byId('composer-error'),
  announcer: byId('announcer'),
  membersPanel: byId('members-panel'),
  membersCount: byId('members-count'),
  membersNote: byId('members-note'),
  members: byId('members'),
  closeMembers: byId('close-members'),
  scrim: byId('scrim'),
};

// --- storage (may be unavailable: private windows, blocked cookies) -------------

/** @param {Storage | undefined} store @param {string} key */
function load(store, key) {
  try {
    return store?.getItem(key) ?? null;
  } catch {
    return null;
  }
}

/** @param {Storage | undefined} store @param {string} key @param {string | null} value */
function save(store, key, value) {
  try {
    if (value === null) store?.removeItem(key);
    else store?.setItem(key, value);
  } catch {
    // not important: the page works without it
  }
}

// --- theme ------------------------------------------------------------------------

function applyTheme(value) {
  const theme = value === 'light' || value === 'dark' ? value : 'system';
  if (theme === 'system') delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  ui.theme.value = theme;
}
applyTheme(load(globalThis.localStorage, THEME_KEY));
ui.theme.addEventListener('change', () => {
  applyTheme(ui.theme.value);
  save(globalThis.localStorage, THEME_KEY, ui.theme.value === 'system' ? null : ui.theme.value);
});

// --- the signed-in session ------------------------------------------------------------

class Session {
  /**
   * @param {Credentials} credentials
   * @param {string[]} channels  To join, in this order.
   * @param {string} [activeId]  The one to show (default: the first).
   */
  constructor(credentials, channels, activeId) {
    this.credentials = credentials;
    this.me = this.identityOf(credentials);
    /** Every user id this page has been signed in as (a development sign-in can change it). */
    this.myIds = new Set([this.me.userId]);
    /** @type {DevTokens | null} */
    this.tokens = null;
    if (credentials.mode === 'name') {
      this.tokens = new DevTokens(credentials.grant, (grant) => this.onNewDevUser(grant));
    }
    /** @type {(() => void) | null} resolves the token prompt */
    this.tokenWanted = null;
    /** @type {Promise<void> | null} shown while the page waits for a pasted token */
    this.tokenPrompt = null;
    /** @type {string | null} a pasted token not tried yet */
    this.freshToken = null;
    this.quickRetryAt = 0;
    /** @type {Map<string, ChannelView>} */
    this.views = new Map();
    /** @type {ChannelView | null} */
    this.active = null;
    this.status = /** @type {'online' | 'away' | 'dnd'} */ ('online');
    /** @type {Map<string, string>} unsent text per channel */
    this.drafts = new Map();
    this.typingIdle = /** @type {ReturnType<typeof setTimeout> | undefined} */ (undefined);
    this.countdown = /** @type {ReturnType<typeof setInterval> | undefined} */ (undefined);
    this.ended = false;
    this.connState = 'connecting';
    this.thread = new ThreadPanel({
      isMine: (id) => this.isMine(id),
      me: () => this.me,
      notify: (text, kind) => notify(text, kind),
      announce: (text) => announce(text),
      toggled: (open) => {
        ui.app.classList.toggle('thread-open', open);
        syncScrim();
      },
    });
    this.conn = new WaddleConnection({
      url: window.location.origin,
      token: (request) => this.tokenFor(request),
    });
    this.conn.on('state', (change) => this.onConnState(change));
    this.conn.on('auth', (detail) => this.onAuth(detail));
    this.conn.on('error', (err) => {
      // A token that could not be fetched (server down) is simply retried.
      if (err.code === 'token') return;
      const prefix = err.code === 'policy_violation' ? 'The server closed the connection: ' : '';
      notify(`${prefix}${err.message}`, 'error');
    });
    this.renderMe();
    for (const id of channels) this.join(id, { select: false });
    const first = this.views.get(activeId ?? channels[0]) ?? this.views.values().next().value ?? null;
    if (first) this.select(first, { focus: true });
    this.persist();
  }

  /** @param {Credentials} credentials */
  identityOf(credentials) {
    if (credentials.mode === 'name') {
      return { userId: credentials.grant.userId, username: credentials.grant.username };
    }
    const { userId, username } = jwtIdentity(credentials.token);
    return { userId, username };
  }

  /** @param {string} userId */
  isMine(userId) {
    return this.myIds.has(userId);
  }

  persist() {
    if (this.ended) return;
    const data = {
      credentials: this.credentials.mode === 'name' && this.tokens
        ? { mode: 'name', grant: this.tokens.grant }
        : this.credentials,
      channels: Array.from(this.views.keys()),
      active: this.active?.id ?? null,
      status: this.status,
    };
    save(globalThis.sessionStorage, SESSION_KEY, JSON.stringify(data));
  }

  // --- tokens -----------------------------------------------------------------------

  /**
   * The token for the next connection attempt.
   * @param {{attempt: number, reason: string}} request
   */
  async tokenFor({ reason }) {
    const refused = reason === 'unauthorized' || reason === 'expired';
    if (this.tokens) return this.tokens.token(refused);
    const credentials = /** @type {{mode: 'token', token: string}} */ (this.credentials);
    if (!refused) return credentials.token;
    // A pasted token the server refused: only the user can get another one.
    if (this.freshToken === null) await this.askForToken();
    const token = this.freshToken ?? credentials.token;
    this.freshToken = null;
    return token;
  }

  /** Show the token prompt (once); resolves when a new token was pasted. */
  askForToken() {
    this.tokenPrompt ??= new Promise((resolve) => {
      this.tokenWanted = () => resolve(undefined);
    });
    this.renderBanner();
    return this.tokenPrompt;
  }

  /** @param {any} detail */
  onAuth(detail) {
    if (this.tokens) {
      const why = detail.code === 'token_expired' ? 'Your sign-in expired' : 'The server refused your sign-in';
      notify(`${why}: getting a new development token…`, 'info');
      // Get one now and try it at once rather than after the backoff delay
      // (once in a while only: a server that refuses every token gets the backoff).
      if (Date.now() - this.quickRetryAt > QUICK_RETRY_EVERY_MS) {
        this.quickRetryAt = Date.now();
        this.tokens.renew().then(
          () => this.conn.retryNow(),
          () => {}, // asked again at the next attempt
        );
      }
    } else {
      void this.askForToken();
    }
  }

  /** @param {import('./tokens.js').DevGrant} grant */
  onNewDevUser(grant) {
    this.me = { userId: grant.userId, username: grant.username };
    this.myIds.add(grant.userId);
    this.renderMe();
    this.persist();
    notify(
      `The server no longer accepted your previous token (it expired, or the server restarted with a ` +
        `different key). You are signed in again as a new development user named ${grant.username}.`,
      'sticky',
    );
  }

  /** A token pasted after the server refused the last one. @param {string} token */
  usePastedToken(token) {
    const identity = jwtIdentity(token); // throws TokenError on garbage
    this.credentials = { mode: 'token', token };
    this.me = { userId: identity.userId, username: identity.username };
    this.myIds.add(identity.userId);
    this.renderMe();
    this.persist();
    this.freshToken = token;
    const waiting = this.tokenWanted;
    this.tokenWanted = null;
    this.tokenPrompt = null;
    this.renderBanner();
    // An attempt waiting for the token goes on; otherwise skip the backoff wait.
    if (waiting) waiting();
    else this.conn.retryNow();
  }

  // --- connection banner ----------------------------------------------------------------

  /** @param {any} change */
  onConnState(change) {
    if (this.ended) return;
    this.connState = change.state;
    this.reconnectAt = change.state === 'reconnecting' && Number.isFinite(change.delayMs)
      ? Date.now() + change.delayMs
      : null;
    this.closeReason = change.state === 'closed' ? change.reason || '' : '';
    this.announceConnection(change);
    this.renderBanner();
    this.renderMeta();
    if (change.state === 'open') {
      ui.presence.value = this.status;
      this.persist(); // the development token may have been renewed
    }
  }

  renderBanner() {
    clearInterval(this.countdown);
    this.countdown = undefined;
    const state = this.connState;
    const pill = {
      connecting: 'Connecting…',
      open: 'Connected',
      reconnecting: 'Reconnecting',
      offline: 'Offline',
      closed: 'Disconnected',
    }[state] ?? state;
    ui.connState.textContent = pill;
    ui.connState.className = `conn-state state-${state}`;
    ui.app.dataset.conn = state;
    ui.tokenForm.hidden = true;
    ui.retryNow.hidden = true;
    if (this.tokenPrompt) {
      ui.banner.hidden = false;
      ui.banner.dataset.state = 'token';
      ui.bannerText.textContent =
        'The server refused your token: it expired, or the server now signs with another key. ' +
        'Paste a new token to reconnect.';
      ui.connAnnouncer.textContent = ui.bannerText.textContent;
      ui.tokenForm.hidden = false;
      return;
    }
    if (state === 'open' || state === 'connecting') {
      ui.banner.hidden = true;
      ui.banner.dataset.state = state;
      ui.bannerText.textContent = '';
      return;
    }
    ui.banner.hidden = false;
    ui.banner.dataset.state = state;
    if (state === 'closed') {
      ui.bannerText.textContent = `Disconnected${this.closeReason ? `: ${this.closeReason}` : ''}.`;
      ui.retryNow.textContent = 'Reconnect';
      ui.retryNow.hidden = false;
      return;
    }
    ui.retryNow.textContent = 'Retry now';
    ui.retryNow.hidden = false;
    if (state === 'offline') {
      ui.bannerText.textContent = 'You are offline. Messages you send wait and go out once the network is back.';
      return;
    }
    const tick = () => {
      const left = this.reconnectAt === null ? 0 : Math.ceil((this.reconnectAt - Date.now()) / 1000);
      ui.bannerText.textContent = left > 0
        ? `Connection lost. Reconnecting in ${left} s…`
        : 'Connection lost. Reconnecting…';
      ui.connState.textContent = left > 0 ? `Reconnecting in ${left} s` : 'Reconnecting…';
    };
    tick();
    this.countdown = setInterval(tick, 250);
  }

  /**
   * Tell screen readers what happened to the connection, once per change
   * (the banner's countdown is not read out every second).
   * @param {any} change
   */
  announceConnection(change) {
    if (change.state === change.previous) return;
    const text = {
      open: change.previous === 'connecting' ? '' : 'Connected again.',
      reconnecting: {
        open: 'Connection lost. Reconnecting.',
        connecting: 'Could not connect. Trying again.',
      }[/** @type {string} */ (change.previous)],
      offline: 'You are offline.',
      closed: 'Disconnected.',
    }[/** @type {string} */ (change.state)];
    if (text) ui.connAnnouncer.textContent = text;
  }

  retry() {
    if (this.connState === 'closed') this.conn.connect();
    else this.conn.retryNow();
  }

  // --- channels -------------------------------------------------------------------------

  /**
   * @param {string} channelId
   * @param {{select?: boolean}} [options]
   * @returns {ChannelView | null}
   */
  join(channelId, options = {}) {
    let view = this.views.get(channelId);
    if (!view) {
      const handle = this.conn.channel(channelId);
      view = new ChannelView(this.channelHost(), handle);
      this.views.set(channelId, view);
      ui.channelList.append(view.item);
      this.persist();
    }
    if (options.select !== false) this.select(view, { focus: true });
    return view;
  }

  /** @returns {import('./channel-view.js').ChannelHost} */
  channelHost() {
    return {
      isMine: (id) => this.isMine(id),
      me: () => this.me,
      isActive: (view) => this.active === view,
      select: (view) => this.select(view, { focus: true }),
      leave: (view) => this.leave(view),
      openThread: (view, message, trigger) => this.thread.open(view, message, trigger),
      threadMessage: (view, message) => this.thread.onMessage(view, message),
      threadOutgoing: (view, outgoing) => this.thread.onOutgoing(view, outgoing),
      failed: (view, reason) => {
        this.leave(view, { told: false });
        showJoinError(`Could not join #${view.id}: ${reason}.`);
      },
      changed: (view) => {
        if (view === this.active) this.renderActive();
      },
      unreadChanged: () => this.renderUnread(),
      announce: (text) => announce(text),
      notify: (text, kind) => notify(text, kind),
      scroller: () => ui.scroller,
    };
  }

  /**
   * @param {ChannelView} view
   * @param {{focus?: boolean}} [options]
   */
  select(view, options = {}) {
    const before = this.active;
    if (before && before !== view) {
      before.savedScroll = before.atBottom() ? null : ui.scroller.scrollTop;
      this.drafts.set(before.id, ui.composer.value);
      this.stopTyping();
    }
    this.active = view;
    for (const other of this.views.values()) {
      other.item.classList.toggle('active', other === view);
      if (other === view) other.link.setAttribute('aria-current', 'page');
      else other.link.removeAttribute('aria-current');
    }
    if (before !== view) {
      ui.scroller.replaceChildren(view.timeline.list);
      ui.scroller.setAttribute('aria-label', `Messages in #${view.id}`);
      ui.composer.value = this.drafts.get(view.id) ?? '';
      ui.scroller.scrollTop = view.savedScroll ?? ui.scroller.scrollHeight;
      sticky.observe(view.timeline.list);
      view.timeline.ensureCurrent();
    }
    ui.composer.placeholder = `Message #${view.id}`;
    ui.composerLabel.textContent = `Message #${view.id}`;
    if (window.location.hash !== `#${view.id}`) {
      window.history.replaceState(null, '', `#${view.id}`);
    }
    this.renderActive();
    this.renderUnread();
    view.markReadIfSeen();
    view.fillView();
    closeDrawers();
    this.persist();
    if (options.focus) ui.composer.focus();
  }

  /**
   * @param {ChannelView} view
   * @param {{told?: boolean}} [options]
   */
  leave(view, options = {}) {
    if (!this.views.has(view.id)) return;
    const order = Array.from(this.views.values());
    const index = order.indexOf(view);
    if (this.thread.view === view) this.thread.close({ restoreFocus: false });
    if (options.told !== false) view.handle.unsubscribe().catch(() => {});
    view.dispose();
    this.views.delete(view.id);
    this.drafts.delete(view.id);
    if (this.active === view) {
      this.active = null;
      const next = order[index + 1] ?? order[index - 1] ?? null;
      if (next && next !== view) {
        this.select(next);
        next.link.focus();
      } else {
        ui.scroller.replaceChildren(emptyState());
        this.renderActive();
        ui.joinInput.focus();
      }
    }
    this.renderUnread();
    this.persist();
  }

  /** @param {number} step */
  selectNeighbour(step) {
    const order = Array.from(this.views.values());
    if (order.length === 0) return;
    const i = this.active ? order.indexOf(this.active) : -1;
    const next = order[(i + step + order.length) % order.length];
    this.select(next, { focus: true });
  }

  // --- what the active channel shows -----------------------------------------------

  renderActive() {
    const view = this.active;
    ui.title.textContent = view ? `#${view.id}` : 'No channel';
    document.title = view ? `#${view.id} · Waddle` : 'Waddle';
    ui.composer.disabled = !view;
    /** @type {HTMLButtonElement} */ (byId('send')).disabled = !view;
    this.renderMeta();
    this.renderMembers();
    this.renderTyping();
    this.renderJump();
    this.renderUnread();
  }

  renderMeta() {
    const view = this.active;
    if (!view) {
      ui.meta.textContent = '';
      return;
    }
    const state = view.state;
    let text;
    if (state === 'subscribing') text = 'joining…';
    else if (state === 'retrying') text = 'busy: trying again shortly';
    else if (this.connState !== 'open') text = 'not connected';
    else if (state === 'resuming' || view.handle.onlineStale) text = 'catching up…';
    else text = `${view.handle.onlineCount} online`;
    ui.meta.textContent = text;
  }

  renderMembers() {
    const view = this.active;
    const stale = !view || view.handle.onlineStale;
    const users = view ? view.handle.onlineUsers : [];
    const count = view ? view.handle.onlineCount : 0;
    users.sort((a, b) => {
      const mine = Number(this.isMine(b.userId)) - Number(this.isMine(a.userId));
      if (mine !== 0) return mine;
      const status =
        (STATUS_ORDER[a.status ?? 'online'] ?? 0) - (STATUS_ORDER[b.status ?? 'online'] ?? 0);
      if (status !== 0) return status;
      return String(a.username).localeCompare(String(b.username), undefined, { sensitivity: 'base' });
    });
    const items = users.map((user) => {
      const status = stale ? 'unknown' : (user.status ?? 'online');
      const item = el('li', `member status-${status}`);
      item.dataset.userId = user.userId;
      const face = avatar(user.userId, user.username);
      face.append(el('span', 'status-dot'));
      const name = el('span', 'member-name', user.username);
      if (this.isMine(user.userId)) name.append(el('span', 'you-tag', ' (you)'));
      const label = stale ? 'status unknown' : STATUS_LABELS[/** @type {keyof typeof STATUS_LABELS} */ (status)] ?? status;
      item.append(face, name, el('span', 'member-status', label));
      return item;
    });
    ui.members.replaceChildren(...items);
    ui.membersPanel.classList.toggle('stale', stale && Boolean(view));
    ui.membersNote.hidden = !(stale && view);
    ui.membersNote.textContent = 'Not connected: this is who was online when the connection dropped.';
    const shown = stale ? '–' : String(count);
    ui.membersCount.textContent = shown;
    ui.membersButtonCount.textContent = shown;
    if (count > users.length && !stale) {
      ui.members.append(el('li', 'member-more', `and ${count - users.length} more`));
    }
  }

  renderTyping() {
    const names = this.active ? this.active.typingNames() : [];
    let text = '';
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length >= 2 && names.length <= 3) text = `${listNames(names)} are typing…`;
    else if (names.length > 3) text = `${names.length} people are typing…`;
    if (ui.typing.textContent !== text) ui.typing.textContent = text;
  }

  renderJump() {
    const view = this.active;
    ui.jumpLatest.hidden = !view || view.atBottom() || (view.handle.unreadCount ?? 0) === 0;
  }

  renderUnread() {
    let others = 0;
    for (const view of this.views.values()) if (view !== this.active) others += view.unread;
    ui.menuBadge.hidden = others === 0;
    ui.menuBadge.textContent = others > 99 ? '99+' : String(others);
    const name = this.active ? `#${this.active.id}` : 'Waddle';
    document.title = others > 0 ? `(${others}) ${name} · Waddle` : `${name} · Waddle`;
    ui.openSidebar.setAttribute(
      'aria-label',
      others > 0 ? `Channels (${plural(others, 'unread message', 'unread messages')})` : 'Channels',
    );
  }

  renderMe() {
    ui.meName.textContent = this.me.username;
    ui.meAvatar.textContent = Array.from(this.me.username.trim())[0] ?? '?';
    ui.meAvatar.className = `avatar ${hueClass(this.me.userId)}`;
  }

  // --- composing ------------------------------------------------------------------------

  send() {
    const view = this.active;
    const content = ui.composer.value;
    ui.composerError.hidden = true;
    if (!view || content.trim() === '') return;
    try {
      view.handle.send(content).catch(() => {
        // shown on the message itself (failed, with Retry)
      });
    } catch (err) {
      ui.composerError.textContent = err instanceof Error ? err.message : String(err);
      ui.composerError.hidden = false;
      return;
    }
    this.stopTyping();
    ui.composer.value = '';
    this.drafts.delete(view.id);
    ui.scroller.scrollTop = ui.scroller.scrollHeight;
    ui.composer.focus();
  }

  onComposerInput() {
    const view = this.active;
    if (!view) return;
    if (ui.composer.value.trim() === '') {
      this.stopTyping();
      return;
    }
    view.handle.setTyping(true);
    clearTimeout(this.typingIdle);
    this.typingIdle = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  stopTyping() {
    clearTimeout(this.typingIdle);
    this.typingIdle = undefined;
    this.active?.handle.setTyping(false);
  }

  /** @param {'online' | 'away' | 'dnd'} status */
  setStatus(status) {
    this.status = status;
    this.conn.setPresence(status);
    this.persist();
    this.renderMembers();
  }

  end() {
    this.ended = true;
    this.stopTyping();
    clearInterval(this.countdown);
    this.tokens?.stop();
    this.thread.close({ restoreFocus: false });
    for (const view of this.views.values()) view.dispose();
    this.views.clear();
    this.conn.close();
  }
}

/** @type {Session | null} */
let session = null;

// --- page-wide pieces ------------------------------------------------------------------------

function emptyState() {
  const box = el('div', 'empty-state');
  box.append(
    el('p', 'empty-title', 'You are not in any channel.'),
    el('p', 'hint', 'Join one by name in the channel list.'),
  );
  return box;
}

/**
 * @param {string} text
 * @param {string} [kind]  'error', 'info', or 'sticky' (stays until dismissed).
 */
function notify(text, kind = 'error') {
  const item = el('li', `notice notice-${kind}`);
  item.append(el('span', 'notice-text', text));
  const dismiss = button('icon-button', '×', 'Dismiss');
  dismiss.addEventListener('click', () => item.remove());
  item.append(dismiss);
  ui.notices.append(item);
  while (ui.notices.children.length > 4) ui.notices.firstElementChild?.remove();
  if (kind !== 'sticky') setTimeout(() => item.remove(), NOTICE_TTL_MS);
}

/** Screen readers hear new messages through this polite live region. @param {string} text */
function announce(text) {
  ui.announcer.textContent = text;
}

/** @param {string} text */
function showJoinError(text) {
  ui.joinError.textContent = text;
  ui.joinError.hidden = false;
}

// --- drawers (narrow screens) and panels -------------------------------------------------

function syncScrim() {
  const open =
    ui.app.classList.contains('sidebar-open') ||
    ui.app.classList.contains('members-open') ||
    (!wide.matches && ui.app.classList.contains('thread-open'));
  ui.scrim.hidden = !open;
  ui.openSidebar.setAttribute('aria-expanded', String(ui.app.classList.contains('sidebar-open')));
  const membersShown = wide.matches
    ? !ui.app.classList.contains('members-collapsed') && !ui.app.classList.contains('thread-open')
    : ui.app.classList.contains('members-open');
  ui.toggleMembers.setAttribute('aria-expanded', String(membersShown));
}

function closeDrawers() {
  ui.app.classList.remove('sidebar-open', 'members-open');
  syncScrim();
}

function openSidebar() {
  ui.app.classList.add('sidebar-open');
  ui.app.classList.remove('members-open');
  syncScrim();
  const current = ui.channelList.querySelector('[aria-current] ') ?? ui.channelList.querySelector('.channel-link');
  /** @type {HTMLElement | null} */ (current ?? ui.joinInput)?.focus();
}

function toggleMembers() {
  if (wide.matches) {
    if (ui.app.classList.contains('thread-open')) session?.thread.close({ restoreFocus: false });
    else ui.app.classList.toggle('members-collapsed');
  } else {
    const open = !ui.app.classList.contains('members-open');
    ui.app.classList.toggle('members-open', open);
    ui.app.classList.remove('sidebar-open');
    if (open) ui.closeMembers.focus();
  }
  syncScrim();
}

ui.openSidebar.addEventListener('click', openSidebar);
ui.closeSidebar.addEventListener('click', () => {
  closeDrawers();
  ui.openSidebar.focus();
});
ui.toggleMembers.addEventListener('click', toggleMembers);
ui.closeMembers.addEventListener('click', () => {
  closeDrawers();
  ui.toggleMembers.focus();
});
ui.scrim.addEventListener('click', () => {
  if (!wide.matches && session?.thread.isOpen) session.thread.close();
  closeDrawers();
});
wide.addEventListener('change', () => {
  closeDrawers();
});

// --- sign-in ----------------------------------------------------------------------------------

/** @returns {'name' | 'token'} */
function signinMode() {
  const checked = /** @type {HTMLInputElement | null} */ (
    ui.signinForm.querySelector('input[name="mode"]:checked')
  );
  return checked?.value === 'token' ? 'token' : 'name';
}

function syncSigninMode() {
  const mode = signinMode();
  ui.nameField.hidden = mode !== 'name';
  ui.tokenField.hidden = mode !== 'token';
}

/** @param {string} text @param {HTMLElement} [focus] */
function signinFailed(text, focus) {
  ui.signinError.textContent = text;
  ui.signinError.hidden = false;
  focus?.focus();
}

/** @param {SubmitEvent} event */
async function onSignIn(event) {
  event.preventDefault();
  ui.signinError.hidden = true;
  const mode = signinMode();
  const channelId = ui.channel.value.trim() || 'general';
  if (!CHANNEL_ID.test(channelId)) {
    signinFailed('Channel names use letters, digits and _ . : - (up to 128 characters, starting with a letter or digit).', ui.channel);
    return;
  }
  ui.signinButton.disabled = true;
  try {
    /** @type {Credentials} */
    let credentials;
    if (mode === 'name') {
      const username = ui.name.value.trim();
      if (username.length < 1 || username.length > 64) {
        signinFailed('Pick a display name (1 to 64 characters).', ui.name);
        return;
      }
      credentials = { mode: 'name', grant: await fetchDevToken({ username }) };
      save(globalThis.localStorage, 'waddle.name', username);
    } else {
      const token = ui.token.value.trim();
      if (!token) {
        signinFailed('Paste a token.', ui.token);
        return;
      }
      jwtIdentity(token); // a clear error for something that is not a JWT
      credentials = { mode: 'token', token };
    }
    start(credentials, [channelId]);
  } catch (err) {
    if (err instanceof TokenError && err.askForToken) {
      /** @type {HTMLInputElement} */ (ui.signinForm.querySelector('input[value="token"]')).checked = true;
      syncSigninMode();
      signinFailed(err.message, ui.token);
    } else {
      signinFailed(err instanceof Error ? err.message : String(err));
    }
  } finally {
    ui.signinButton.disabled = false;
  }
}

/**
 * @param {Credentials} credentials
 * @param {string[]} channels
 * @param {{status?: string, active?: string}} [options]
 */
function start(credentials, channels, options = {}) {
  ui.signin.hidden = true;
  ui.app.hidden = false;
  ui.notices.replaceChildren();
  ui.joinError.hidden = true;
  ui.presence.value = 'online';
  session = new Session(credentials, channels, options.active);
  const status = options.status;
  if (status === 'away' || status === 'dnd') {
    ui.presence.value = status;
    session.setStatus(status);
  }
}

function signOut() {
  session?.end();
  session = null;
  save(globalThis.sessionStorage, SESSION_KEY, null);
  ui.app.hidden = true;
  ui.signin.hidden = false;
  ui.scroller.replaceChildren();
  ui.channelList.replaceChildren();
  ui.members.replaceChildren();
  document.title = 'Waddle';
  window.history.replaceState(null, '', window.location.pathname);
  ui.name.focus();
}

// --- wiring ---------------------------------------------------------------------------------------

ui.signinForm.addEventListener('submit', onSignIn);
for (const radio of ui.signinForm.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener('change', syncSigninMode);
}
ui.signOut.addEventListener('click', signOut);

ui.joinForm.addEventListener('submit', (event) => {
  event.preventDefault();
  ui.joinError.hidden = true;
  const id = ui.joinInput.value.trim().replace(/^#/, '');
  if (!CHANNEL_ID.test(id)) {
    showJoinError('Channel names use letters, digits and _ . : - (up to 128 characters, starting with a letter or digit).');
    ui.joinInput.focus();
    return;
  }
  ui.joinInput.value = '';
  session?.join(id);
});

ui.composerForm.addEventListener('submit', (event) => {
  event.preventDefault();
  session?.send();
});
ui.composer.addEventListener('input', () => session?.onComposerInput());
ui.composer.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composerForm.requestSubmit();
  }
});

ui.presence.addEventListener('change', () => {
  const value = ui.presence.value;
  if (value === 'online' || value === 'away' || value === 'dnd') session?.setStatus(value);
});

ui.retryNow.addEventListener('click', () => session?.retry());
ui.tokenForm.addEventListener('submit', (event) => {
  event.preventDefault();
  try {
    session?.usePastedToken(ui.newToken.value.trim());
    ui.newToken.value = '';
  } catch (err) {
    notify(err instanceof Error ? err.message : String(err));
  }
});

ui.jumpLatest.addEventListener('click', () => {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
  session?.active?.markReadIfSeen();
  ui.composer.focus();
});

ui.scroller.addEventListener('scroll', () => {
  const view = session?.active;
  if (!view) return;
  if (ui.scroller.scrollTop < 300) void view.loadOlder();
  view.markReadIfSeen();
  session?.renderJump();
}, { passive: true });

document.addEventListener('visibilitychange', () => session?.active?.markReadIfSeen());

// The skip link moves the focus without touching the URL (the hash names the channel).
/** @type {HTMLElement} */ (document.querySelector('.skip-link')).addEventListener('click', (event) => {
  event.preventDefault();
  ui.composer.focus();
});

// Arrow keys move through the channel list.
ui.channelList.addEventListener('keydown', (event) => {
  if (event.key !== 'ArrowDown' && event.key !== 'ArrowUp') return;
  const links = Array.from(ui.channelList.querySelectorAll('.channel-link'));
  const i = links.indexOf(/** @type {Element} */ (event.target));
  if (i < 0) return;
  event.preventDefault();
  const next = links[(i + (event.key === 'ArrowDown' ? 1 : -1) + links.length) % links.length];
  /** @type {HTMLElement} */ (next).focus();
});

document.addEventListener('keydown', (event) => {
  if (!session) return;
  if (event.key === 'Escape') {
    if (ui.app.classList.contains('sidebar-open')) {
      closeDrawers();
      ui.openSidebar.focus();
    } else if (ui.app.classList.contains('members-open')) {
      closeDrawers();
      ui.toggleMembers.focus();
    } else if (session.thread.isOpen) {
      session.thread.close();
    } else {
      return;
    }
    event.preventDefault();
  } else if (event.altKey && (event.key === 'ArrowUp' || event.key === 'ArrowDown')) {
    event.preventDefault();
    session.selectNeighbour(event.key === 'ArrowDown' ? 1 : -1);
  }
});

window.addEventListener('hashchange', () => {
  const id = decodeURIComponent(window.location.hash.slice(1));
  if (session && CHANNEL_ID.test(id) && session.active?.id !== id) session.join(id);
});

// "Today" becomes "Yesterday" at midnight.
let today = new Date().toDateString();
setInterval(() => {
  const now = new Date().toDateString();
  if (now === today || !session) return;
  today = now;
  for (const view of session.views.values()) view.timeline.refreshDays();
}, 60_000);

window.addEventListener('pagehide', (event) => {
  if (!event.persisted) session?.conn.close(1001, 'page closed');
});

// --- start ------------------------------------------------------------------------------------------

function boot() {
  ui.name.value = load(globalThis.localStorage, 'waddle.name') ?? '';
  const fromHash = decodeURIComponent(window.location.hash.slice(1));
  if (CHANNEL_ID.test(fromHash)) ui.channel.value = fromHash;
  syncSigninMode();
  const saved = load(globalThis.sessionStorage, SESSION_KEY);
  if (saved) {
    try {
      const data = JSON.parse(saved);
      const channels = Array.isArray(data.channels) ? data.channels.filter((c) => CHANNEL_ID.test(c)) : [];
      if (CHANNEL_ID.test(fromHash) && !channels.includes(fromHash)) channels.push(fromHash);
      const active = CHANNEL_ID.test(fromHash) ? fromHash : data.active;
      if (data.credentials && channels.length > 0) {
        start(data.credentials, channels, { status: data.status, active });
        return;
      }
    } catch {
      save(globalThis.sessionStorage, SESSION_KEY, null);
    }
  }
  (ui.name.value ? ui.channel : ui.name).focus();
}

boot();
