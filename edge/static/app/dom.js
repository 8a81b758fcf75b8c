// Small DOM and formatting helpers of the chat page. Text from the server
// is only ever set with textContent, never parsed as HTML.

/**
 * @param {string} id
 * @returns {HTMLElement}
 */
export function byId(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`#${id} is missing from the page`);
  return node;
}

/**
 * @template {keyof HTMLElementTagNameMap} K
 * @param {K} tag
 * @param {string} [className]
 * @param {string} [text]  Set with textContent: never parsed as HTML.
 * @returns {HTMLElementTagNameMap[K]}
 */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/**
 * A button that is not a form submit.
 * @param {string} className
 * @param {string} text
 * @param {string} [label]  Accessible name when the text alone is not one.
 */
export function button(className, text, label) {
  const node = el('button', className, text);
  node.type = 'button';
  if (label) node.setAttribute('aria-label', label);
  return node;
}

/** Stable colour class for a user. @param {string} key */
export function hueClass(key) {
  let h = 0;
  for (const ch of key) h = (h * 31 + (ch.codePointAt(0) ?? 0)) >>> 0;
  return `hue-${h % 8}`;
}

/**
 * A round avatar with the first letter of the name (decorative: the name is
 * always written next to it).
 * @param {string} userId
 * @param {string} username
 * @param {string} [extra]  More classes.
 */
export function avatar(userId, username, extra = '') {
  const letter = Array.from(username.trim())[0] ?? '?';
  const node = el('span', `avatar ${hueClass(userId)} ${extra}`.trim(), letter);
  node.setAttribute('aria-hidden', 'true');
  return node;
}

/** @param {number} ms */
export function formatTime(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: 'numeric', minute: '2-digit' });
}

/** Local calendar day of a timestamp, e.g. "2025-3-14". @param {number} ms */
export function dayKey(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${d.getMonth() + 1}-${d.getDate()}`;
}

/**
 * "Today", "Yesterday", or the date.
 * @param {number} ms
 * @param {number} [now]
 */
export function dayLabel(ms, now = Date.now()) {
  const key = dayKey(ms);
  if (key === dayKey(now)) return 'Today';
  const yesterday = new Date(now);
  yesterday.setDate(yesterday.getDate() - 1);
  if (key === dayKey(yesterday.getTime())) return 'Yesterday';
  const d = new Date(ms);
  /** @type {Intl.DateTimeFormatOptions} */
  const options = { weekday: 'long', month: 'long', day: 'numeric' };
  if (d.getFullYear() !== new Date(now).getFullYear()) options.year = 'numeric';
  return d.toLocaleDateString([], options);
}

/**
 * "1 reply", "3 replies".
 * @param {number} n
 * @param {string} one
 * @param {string} many
 */
export function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

/**
 * "alice", "alice and bob", "alice, bob and carol".
 * @param {string[]} names
 */
export function listNames(names) {
  if (names.length <= 1) return names.join('');
  return `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]}`;
}

/** Human words for a presence status. */
export const STATUS_LABELS = Object.freeze({
  online: 'Online',
  away: 'Away',
  dnd: 'Do not disturb',
});

/**
 * Keep a scrolling box at its bottom while the reader is there, whatever
 * changes its size (new rows, a panel opening beside it, a resized window).
 * @param {HTMLElement} scroller
 * @returns {{observe: (content: Element) => void, atBottom: () => boolean}}
 */
export function stickToBottom(scroller) {
  let bottom = true;
  const measure = () => {
    bottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 60;
  };
  scroller.addEventListener('scroll', measure, { passive: true });
  /** @type {Element | null} */
  let watched = null;
  const observer = new ResizeObserver(() => {
    if (bottom) scroller.scrollTop = scroller.scrollHeight;
  });
  observer.observe(scroller);
  return {
    observe(content) {
      if (watched) observer.unobserve(watched);
      watched = content;
      observer.observe(content);
      measure();
    },
    atBottom: () => bottom,
  };
}
