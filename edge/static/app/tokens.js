// Tokens of the chat page: development tokens minted by the edge
// (`POST /dev/token`, development mode only) and renewed for the same user,
// or a token the user pasted.

// Renew a development token no sooner than this after getting it (even if the
// clocks disagree), and retry a failed renewal after this long.
const TOKEN_RETRY_MS = 30_000;
const MAX_TIMER_MS = 2 ** 31 - 1; // setTimeout fires at once for longer delays
// A token got this recently is not fetched again when the server refuses the
// previous one (the refusal came before it was tried).
const JUST_RENEWED_MS = 5_000;

export class TokenError extends Error {
  /** @param {string} message @param {{askForToken?: boolean, status?: number}} [options] */
  constructor(message, options = {}) {
    super(message);
    this.askForToken = Boolean(options.askForToken);
    this.status = options.status ?? 0;
  }
}

/** @typedef {{token: string, userId: string, username: string, expiresAt: number}} DevGrant */

/**
 * Get a development token from the edge: for a new user named `username`,
 * or, given the `current` (still valid) development token, for its user.
 * @param {{username: string} | {current: string}} request
 * @returns {Promise<DevGrant>}
 */
export async function fetchDevToken(request) {
  let response;
  try {
    response = await fetch(
      '/dev/token',
      'current' in request
        ? { method: 'POST', headers: { Authorization: `Bearer ${request.current}` } }
        : {
            method: 'POST',
            headers: { 'Content-Type': 'application/json' },
            body: JSON.stringify({ username: request.username }),
          },
    );
  } catch {
    throw new TokenError('Could not reach the server to get a token.');
  }
  if (response.status === 404) {
    throw new TokenError(
      'This server does not hand out development tokens (only a server started with ' +
        'WADDLE_DEV_MODE=1 does). Sign in with a token instead.',
      { askForToken: true },
    );
  }
  if (!response.ok) {
    const detail = (await response.text()).trim();
    const text = `Could not get a token (HTTP ${response.status})${detail ? `: ${detail}` : ''}.`;
    throw new TokenError(text, { status: response.status });
  }
  return response.json();
}

/**
 * The development tokens of one user. Every `POST /dev/token` with a name
 * makes a new user, so the page renews the token it holds (same user) once
 * half its life has passed: on a timer, so that a socket open longer than
 * a token lives reconnects as the same user, and before any connect that
 * finds the renewal due. Only a token the server no longer accepts (it
 * expired unrenewed, or the server's key changed) makes the page ask for a
 * new user; `onNewUser` hears of it.
 */
export class DevTokens {
  /** @param {DevGrant} grant @param {(grant: DevGrant) => void} onNewUser */
  constructor(grant, onNewUser) {
    this.onNewUser = onNewUser;
    /** @type {Promise<void> | null} */
    this.renewing = null;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.timer = undefined;
    this.stopped = false;
    this.grant = grant;
    this.renewAt = 0;
    this.renewedAt = 0;
    this.set(grant);
  }

  /**
   * The token for the next connect. `fresh`: the server refused the last
   * one, so get another even if this one looks valid.
   * @param {boolean} [fresh]
   */
  async token(fresh = false) {
    const renewedJustNow = Date.now() - this.renewedAt < JUST_RENEWED_MS;
    if ((fresh && !renewedJustNow) || Date.now() >= this.renewAt) await this.renew();
    return this.grant.token;
  }

  /** @returns {Promise<void>} */
  renew() {
    this.renewing ??= this.renewNow().finally(() => {
      this.renewing = null;
    });
    return this.renewing;
  }

  /** @private */
  async renewNow() {
    const name = this.grant.username;
    try {
      this.set(await fetchDevToken({ current: this.grant.token }));
    } catch (err) {
      if (!(err instanceof TokenError && err.status === 401)) throw err;
      this.set(await fetchDevToken({ username: name }));
      this.onNewUser(this.grant);
    }
  }

  /** @private @param {DevGrant} grant */
  set(grant) {
    const now = Date.now();
    this.grant = grant;
    this.renewedAt = now;
    this.renewAt = now + Math.max((grant.expiresAt - now) / 2, TOKEN_RETRY_MS);
    this.schedule(0);
  }

  /** @private @param {number} atLeastMs */
  schedule(atLeastMs) {
    clearTimeout(this.timer);
    if (this.stopped) return;
    const delay = Math.min(Math.max(this.renewAt - Date.now(), atLeastMs), MAX_TIMER_MS);
    this.timer = setTimeout(() => {
      if (Date.now() < this.renewAt) {
        this.schedule(0);
        return;
      }
      // A failure (offline, say) is retried; a connect in between retries too.
      this.renew().catch(() => this.schedule(TOKEN_RETRY_MS));
    }, delay);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
  }
}

/**
 * Read the identity claims of a JWT (no verification: the server does that).
 * @param {string} token
 * @returns {{userId: string, username: string, expiresAt: number | null}}
 */
export function jwtIdentity(token) {
  let claims;
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = new TextDecoder().decode(
      Uint8Array.from(atob(part.padEnd(Math.ceil(part.length / 4) * 4, '=')), (c) =>
        c.charCodeAt(0),
      ),
    );
    claims = JSON.parse(json);
  } catch {
    throw new TokenError('That is not a token: a JWT has three parts separated by dots.');
  }
  if (!claims || typeof claims.sub !== 'string' || !claims.sub) {
    throw new TokenError('That token names no user (it has no "sub" claim).');
  }
  const exp = Number(claims.exp);
  return {
    userId: claims.sub,
    username: String(claims.username ?? claims.sub),
    expiresAt: Number.isFinite(exp) ? exp * 1000 : null,
  };
}
