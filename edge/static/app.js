// Waddle demo chat page. Everything the server sends is rendered with
// textContent, never as HTML; the page runs under a strict CSP (no inline
// scripts or styles).

import { WaddleClient } from './waddle.js';

const TYPING_THROTTLE_MS = 2000; // re-announce "typing" at most this often
const TYPING_IDLE_MS = 3000; // stop typing after this much idle time
const TYPING_EXPIRE_MS = 6000; // forget a remote typist not heard from for this long
const GROUP_WINDOW_MS = 5 * 60 * 1000; // merge consecutive messages of one author
const ERROR_TTL_MS = 8000;
const CHANNEL_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/;

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

const ui = {
  joinView: $('join'),
  joinForm: /** @type {HTMLFormElement} */ ($('join-form')),
  name: /** @type {HTMLInputElement} */ ($('name')),
  channel: /** @type {HTMLInputElement} */ ($('channel')),
  token: /** @type {HTMLTextAreaElement} */ ($('token')),
  tokenDetails: /** @type {HTMLDetailsElement} */ ($('token-details')),
  joinError: $('join-error'),
  joinButton: /** @type {HTMLButtonElement} */ ($('join-button')),
  chatView: $('chat'),
  channelTitle: $('channel-title'),
  connState: $('conn-state'),
  presenceWrap: $('presence-wrap'),
  presence: /** @type {HTMLSelectElement} */ ($('presence')),
  leave: $('leave'),
  errors: $('errors'),
  messages: $('messages'),
  empty: $('empty'),
  typing: $('typing'),
  composerForm: /** @type {HTMLFormElement} */ ($('composer-form')),
  composer: /** @type {HTMLTextAreaElement} */ ($('composer')),
  users: $('users'),
  usersCount: $('users-count'),
};

/**
 * Everything about the current session; replaced on every join.
 * @type {null | {
 *   client: WaddleClient,
 *   me: {userId: string, username: string},
 *   channelId: string,
 *   users: Map<string, {userId: string, username: string, status: string}>,
 *   typists: Map<string, {username: string, timer: number}>,
 *   pending: Map<string, HTMLElement>,
 *   last: null | {userId: string, timestamp: number},
 *   typingActive: boolean,
 *   typingSentAt: number,
 *   typingIdle: number | undefined,
 *   countdown: number | undefined,
 * }}
 */
let session = null;

// --- small DOM helpers ------------------------------------------------------

/**
 * @param {string} tag
 * @param {string} [className]
 * @param {string} [text]  Set with textContent: never parsed as HTML.
 */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Stable colour class for a user. @param {string} key */
function hueClass(key) {
  let h = 0;
  for (const ch of key) h = (h * 31 + (ch.codePointAt(0) ?? 0)) >>> 0;
  return `hue-${h % 8}`;
}

/** @param {string} userId @param {string} username */
function avatar(userId, username) {
  const letter = Array.from(username.trim())[0] ?? '?';
  const node = el('div', `avatar ${hueClass(userId)}`, letter);
  node.setAttribute('aria-hidden', 'true');
  return node;
}

/** @param {number} ms */
function formatTime(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function nearBottom() {
  const list = ui.messages;
  return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

/** Insert before the pending (not yet acknowledged) messages, which stay last. */
function appendToList(node) {
  const stick = nearBottom();
  const firstPending = ui.messages.querySelector('.msg.pending');
  ui.messages.insertBefore(node, firstPending);
  ui.empty.hidden = true;
  if (stick || node.classList.contains('mine')) scrollToBottom();
}

/** @param {string} text @param {{sticky?: boolean}} [options] */
function showError(text, options = {}) {
  const item = el('li');
  item.append(el('span', '', text));
  const dismiss = el('button', '', '×');
  dismiss.setAttribute('type', 'button');
  dismiss.setAttribute('aria-label', 'Dismiss');
  dismiss.addEventListener('click', () => item.remove());
  item.append(dismiss);
  ui.errors.append(item);
  if (!options.sticky) setTimeout(() => item.remove(), ERROR_TTL_MS);
}

/** @param {string} text */
function systemNote(text) {
  appendToList(el('li', 'system', text));
  if (session) session.last = null;
}

// --- tokens -----------------------------------------------------------------

class TokenError extends Error {
  /** @param {string} message @param {{askForToken?: boolean}} [options] */
  constructor(message, options = {}) {
    super(message);
    this.askForToken = Boolean(options.askForToken);
  }
}

/**
 * Get a development token for `username` from the edge.
 * @param {string} username
 * @returns {Promise<{token: string, userId: string, username: string, expiresAt: number}>}
 */
async function fetchDevToken(username) {
  let response;
  try {
    response = await fetch('/dev/token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ username }),
    });
  } catch {
    throw new TokenError('Could not reach the server to get a token.');
  }
  if (response.status === 404) {
    throw new TokenError(
      'This server does not hand out development tokens (they exist only when it runs with ' +
        'WADDLE_DEV_MODE=1). Paste a token under "Use an existing token" instead.',
      { askForToken: true },
    );
  }
  if (!response.ok) {
    const detail = (await response.text()).trim();
    throw new TokenError(`Could not get a token (HTTP ${response.status})${detail ? `: ${detail}` : ''}.`);
  }
  return response.json();
}

/**
 * Read the identity claims of a JWT (no verification: the server does that).
 * @param {string} token
 */
function jwtIdentity(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = new TextDecoder().decode(
      Uint8Array.from(atob(part.padEnd(Math.ceil(part.length / 4) * 4, '=')), (c) =>
        c.charCodeAt(0),
      ),
    );
    const claims = JSON.parse(json);
    return { userId: String(claims.sub ?? ''), username: String(claims.username ?? claims.sub ?? '') };
  } catch {
    throw new TokenError('That token is not a JWT.');
  }
}

// --- rendering ----------------------------------------------------------------

/** @param {import('./waddle.js').ChatMessage} message */
function renderMessage(message) {
  const s = session;
  if (!s) return;
  const mine = message.userId === s.me.userId;
  const continued =
    s.last !== null &&
    s.last.userId === message.userId &&
    message.timestamp - s.last.timestamp < GROUP_WINDOW_MS;
  s.last = { userId: message.userId, timestamp: message.timestamp };

  const item = el('li', `msg${mine ? ' mine' : ''}${continued ? ' continued' : ''}`);
  item.dataset.seq = String(message.seq);
  item.append(avatar(message.userId, message.username));
  const body = el('div', 'body');
  const meta = el('div', 'meta');
  meta.append(el('span', 'author', message.username));
  const time = el('time', 'time', formatTime(message.timestamp));
  time.setAttribute('datetime', new Date(message.timestamp).toISOString());
  time.title = new Date(message.timestamp).toLocaleString();
  meta.append(time);
  if (message.threadId) meta.append(el('span', 'status-note', 'in thread'));
  body.append(meta, el('p', 'content', message.content));
  item.append(body);
  appendToList(item);
}

/** A message of ours waiting for its ack. @param {string} clientMsgId @param {string} content */
function renderPending(clientMsgId, content) {
  const s = session;
  if (!s) return;
  const item = el('li', 'msg mine pending');
  item.append(avatar(s.me.userId, s.me.username));
  const body = el('div', 'body');
  const meta = el('div', 'meta');
  meta.append(el('span', 'author', s.me.username), el('span', 'status-note', 'sending…'));
  body.append(meta, el('p', 'content', content));
  item.append(body);
  ui.messages.append(item);
  ui.empty.hidden = true;
  scrollToBottom();
  s.pending.set(clientMsgId, item);
}

function renderUsers() {
  const s = session;
  if (!s) return;
  const users = Array.from(s.users.values()).sort((a, b) =>
    a.username.localeCompare(b.username, undefined, { sensitivity: 'base' }),
  );
  const items = users.map((user) => {
    const item = el('li', `user status-${user.status}`);
    item.dataset.userId = user.userId;
    item.append(avatar(user.userId, user.username));
    const name = el('span', 'user-name', user.username);
    if (user.userId === s.me.userId) name.append(el('span', 'you', ' (you)'));
    item.append(name);
    const label = { online: 'online', away: 'away', dnd: 'do not disturb' }[user.status] ?? user.status;
    item.append(el('span', 'status-note', label));
    item.title = `${user.username}: ${label}`;
    return item;
  });
  ui.users.replaceChildren(...items);
  ui.usersCount.textContent = String(users.length);
}

function renderTyping() {
  const s = session;
  if (!s) return;
  const names = Array.from(s.typists.values(), (t) => t.username);
  let text = '';
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = `${names.length} people are typing…`;
  ui.typing.textContent = text;
}

/** @param {string} userId */
function stopRemoteTyping(userId) {
  const s = session;
  const typist = s?.typists.get(userId);
  if (!s || !typist) return;
  clearTimeout(typist.timer);
  s.typists.delete(userId);
  renderTyping();
}

/**
 * @param {import('./waddle.js').ConnectionState} state
 * @param {import('./waddle.js').StateChange} [change]
 */
function renderState(state, change) {
  const s = session;
  if (s?.countdown !== undefined) {
    clearInterval(s.countdown);
    s.countdown = undefined;
  }
  ui.connState.className = `conn-state state-${state}`;
  const labels = { connecting: 'Connecting…', open: 'Connected', closed: 'Disconnected' };
  if (state !== 'reconnecting' || !change?.delayMs || !s) {
    ui.connState.textContent = labels[state] ?? 'Reconnecting…';
    return;
  }
  const until = Date.now() + change.delayMs;
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    ui.connState.textContent = left > 0 ? `Reconnecting in ${left} s…` : 'Reconnecting…';
  };
  tick();
  s.countdown = setInterval(tick, 1000);
}

// --- typing (outgoing) ---------------------------------------------------------

function stopTyping() {
  const s = session;
  if (!s) return;
  clearTimeout(s.typingIdle);
  s.typingIdle = undefined;
  if (s.typingActive) {
    s.typingActive = false;
    s.client.setTyping(false);
  }
}

function onComposerInput() {
  const s = session;
  if (!s) return;
  if (ui.composer.value.trim() === '') {
    stopTyping();
    return;
  }
  const now = Date.now();
  if (!s.typingActive || now - s.typingSentAt >= TYPING_THROTTLE_MS) {
    if (s.client.setTyping(true)) {
      s.typingActive = true;
      s.typingSentAt = now;
    }
  }
  clearTimeout(s.typingIdle);
  s.typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
}

// --- session ---------------------------------------------------------------------

/**
 * @param {{channelId: string, me: {userId: string, username: string},
 *          token: string | (() => Promise<string>)}} params
 */
function startSession({ channelId, me, token }) {
  const client = new WaddleClient({ url: window.location.origin, channelId, token });
  session = {
    client,
    me,
    channelId,
    users: new Map(),
    typists: new Map(),
    pending: new Map(),
    last: null,
    typingActive: false,
    typingSentAt: 0,
    typingIdle: undefined,
    countdown: undefined,
  };
  const s = session;

  client.on('state', (change) => {
    if (session !== s) return;
    renderState(change.state, change);
  });
  client.on('initial_state', (frame) => {
    s.users.clear();
    for (const user of frame.onlineUsers ?? []) {
      s.users.set(user.userId, {
        userId: user.userId,
        username: user.username,
        status: user.status ?? 'online',
      });
    }
    renderUsers();
  });
  client.on('message', (message) => {
    stopRemoteTyping(message.userId);
    renderMessage(message);
  });
  client.on('ack', (ack) => {
    s.pending.get(ack.clientMsgId)?.remove();
    s.pending.delete(ack.clientMsgId);
  });
  client.on('typing', (frame) => {
    if (frame.userId === s.me.userId) return;
    const previous = s.typists.get(frame.userId);
    if (previous) clearTimeout(previous.timer);
    if (frame.isTyping) {
      const timer = setTimeout(() => stopRemoteTyping(frame.userId), TYPING_EXPIRE_MS);
      s.typists.set(frame.userId, { username: frame.username, timer });
    } else {
      s.typists.delete(frame.userId);
    }
    renderTyping();
  });
  client.on('presence', (frame) => {
    const user = s.users.get(frame.userId);
    if (user) user.status = frame.status;
    else s.users.set(frame.userId, { ...frame, status: frame.status });
    renderUsers();
  });
  client.on('user_connected', (frame) => {
    if (!s.users.has(frame.userId)) {
      s.users.set(frame.userId, { userId: frame.userId, username: frame.username, status: 'online' });
      renderUsers();
      systemNote(`${frame.username} joined`);
    }
  });
  client.on('user_disconnected', (frame) => {
    stopRemoteTyping(frame.userId);
    if (s.users.delete(frame.userId)) {
      renderUsers();
      systemNote(`${frame.username} left`);
    }
  });
  client.on('error', (err) => {
    if (err.clientMsgId && !err.retryable) {
      // Refused for good: the client dropped it from its outbox.
      s.pending.get(err.clientMsgId)?.remove();
      s.pending.delete(err.clientMsgId);
    }
    if (err.retryable) {
      showError(`${err.message}: retrying…`);
    } else {
      const fatal = err.code === 'policy_violation' || err.code === 'token_expired';
      showError(fatal ? `${err.message}. Leave and join again to reconnect.` : err.message, {
        sticky: fatal,
      });
    }
  });

  ui.channelTitle.textContent = `# ${channelId}`;
  ui.channelTitle.hidden = false;
  ui.presence.value = 'online';
  ui.presenceWrap.hidden = false;
  ui.leave.hidden = false;
  ui.messages.replaceChildren();
  ui.errors.replaceChildren();
  ui.users.replaceChildren();
  ui.usersCount.textContent = '0';
  ui.typing.textContent = '';
  ui.empty.hidden = false;
  ui.joinView.hidden = true;
  ui.chatView.hidden = false;
  document.title = `#${channelId} · Waddle`;
  ui.composer.focus();
}

function endSession() {
  const s = session;
  if (!s) return;
  stopTyping();
  for (const typist of s.typists.values()) clearTimeout(typist.timer);
  if (s.countdown !== undefined) clearInterval(s.countdown);
  s.client.close();
  session = null;
  ui.chatView.hidden = true;
  ui.joinView.hidden = false;
  ui.channelTitle.hidden = true;
  ui.presenceWrap.hidden = true;
  ui.leave.hidden = true;
  ui.connState.className = 'conn-state state-idle';
  ui.connState.textContent = 'Not connected';
  document.title = 'Waddle';
  ui.name.focus();
}

/** @param {SubmitEvent} event */
async function onJoin(event) {
  event.preventDefault();
  ui.joinError.hidden = true;
  const username = ui.name.value.trim();
  const channelId = ui.channel.value.trim();
  const pasted = ui.token.value.trim();
  const fail = (text) => {
    ui.joinError.textContent = text;
    ui.joinError.hidden = false;
  };
  if (!pasted && (username.length < 1 || username.length > 64)) {
    fail('Pick a display name (1 to 64 characters).');
    ui.name.focus();
    return;
  }
  if (!CHANNEL_RE.test(channelId)) {
    fail('Channel ids use letters, digits and _ . : - (up to 128 characters).');
    ui.channel.focus();
    return;
  }
  ui.joinButton.disabled = true;
  try {
    if (pasted) {
      startSession({ channelId, me: jwtIdentity(pasted), token: pasted });
    } else {
      let grant = await fetchDevToken(username);
      // Dev tokens expire: fetch a fresh one before a reconnect needs it.
      const token = async () => {
        if (Date.now() > grant.expiresAt - 60_000) grant = await fetchDevToken(username);
        return grant.token;
      };
      startSession({ channelId, me: { userId: grant.userId, username: grant.username }, token });
    }
    try {
      localStorage.setItem('waddle.name', username);
    } catch {
      // storage may be unavailable (private mode): not important
    }
    if (window.location.hash !== `#${channelId}`) window.location.hash = channelId;
  } catch (err) {
    fail(err instanceof TokenError ? err.message : `Could not join: ${err}`);
    if (err instanceof TokenError && err.askForToken) {
      ui.tokenDetails.open = true;
      ui.token.focus();
    }
  } finally {
    ui.joinButton.disabled = false;
  }
}

/** @param {SubmitEvent} event */
function onSend(event) {
  event.preventDefault();
  const s = session;
  if (!s) return;
  const content = ui.composer.value;
  if (content.trim() === '') return;
  let clientMsgId;
  try {
    clientMsgId = s.client.send(content);
  } catch (err) {
    showError(err instanceof Error ? err.message : String(err));
    return;
  }
  stopTyping();
  renderPending(clientMsgId, content);
  ui.composer.value = '';
  ui.composer.focus();
}

// --- wiring ----------------------------------------------------------------------

ui.joinForm.addEventListener('submit', onJoin);
ui.composerForm.addEventListener('submit', onSend);
ui.composer.addEventListener('input', onComposerInput);
ui.composer.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composerForm.requestSubmit();
  }
});
ui.presence.addEventListener('change', () => {
  const s = session;
  if (!s) return;
  const status = /** @type {import('./waddle.js').PresenceStatus} */ (ui.presence.value);
  s.client.setPresence(status);
  const me = s.users.get(s.me.userId);
  if (me) {
    me.status = status;
    renderUsers();
  }
});
ui.leave.addEventListener('click', endSession);
window.addEventListener('pagehide', () => session?.client.close());
window.addEventListener('pageshow', (event) => {
  // Restored from the back/forward cache: the socket was closed on pagehide.
  if (event.persisted && session?.client.state === 'closed') session.client.connect();
});
// Back online: skip the rest of the backoff wait.
window.addEventListener('online', () => {
  if (session?.client.state === 'reconnecting') session.client.connect();
});

try {
  ui.name.value = localStorage.getItem('waddle.name') ?? '';
} catch {
  // ignore
}
const fromHash = decodeURIComponent(window.location.hash.slice(1));
if (CHANNEL_RE.test(fromHash)) ui.channel.value = fromHash;
(ui.name.value ? ui.channel : ui.name).focus();
