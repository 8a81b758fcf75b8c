"""Who is connecting: bearer-token extraction and JWT verification.

Tokens arrive as ``Authorization: Bearer <jwt>`` or, from browsers, as the
WebSocket subprotocol ``bearer.<jwt>`` beside ``waddle.v1``. Tokens are
never logged and never echoed back.

A correctly signed token is still hostile input: every identity claim is
checked with the rules message fields follow (``waddle_common.text``), and
the time claims must be JSON numbers within a sane range, so that anything
the edge admits can be stored and shown, and nothing in a token can make
the edge fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from waddle_common.text import has_control_chars, has_nul, has_surrogates

log = logging.getLogger("edge.auth")

SUBPROTOCOL = "waddle.v1"
_BEARER_PROTOCOL_PREFIX = "bearer."
KNOWN_PERMISSIONS = frozenset({"read", "write"})
# Marks the tokens ``POST /dev/token`` mints: only those can be renewed there.
DEV_CLAIM = "waddle_dev"
# NumericDate claims (exp, nbf, iat) beyond 9999-12-31T23:59:59Z are refused.
MAX_NUMERIC_DATE = 253_402_300_799
# One shared set object per combination: every connection keeps its
# identity for its whole life, and a fresh frozenset each costs ~200 bytes.
_PERMISSION_SETS = {
    s: s for s in (frozenset(), frozenset({"read"}), frozenset({"write"}), KNOWN_PERMISSIONS)
}


class AuthError(Exception):
    """The request carries no acceptable token. ``str()`` is safe to log."""


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    username: str
    permissions: frozenset[str]
    avatar_url: str
    channels: frozenset[str] | None  # None: any channel
    expires_at: float

    def may_join(self, channel_id: str) -> bool:
        return "read" in self.permissions and (self.channels is None or channel_id in self.channels)


def extract_token(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for proto in _split_protocols(headers.get("Sec-WebSocket-Protocol", "")):
        if proto.startswith(_BEARER_PROTOCOL_PREFIX) and len(proto) > len(_BEARER_PROTOCOL_PREFIX):
            return proto[len(_BEARER_PROTOCOL_PREFIX) :]
    return None


def _split_protocols(header: str) -> Iterable[str]:
    return (p.strip() for p in header.split(",") if p.strip())


class TokenVerifier:
    """Verifies client JWTs.

    Algorithms are pinned by configuration: HMAC ones (``HS*``) are checked
    against the shared secret, asymmetric ones (``RS*``, ``ES*``, ``PS*``)
    against the key the JWKS document names (``kid``). A token whose header
    names any other algorithm - ``none`` included - is refused before its
    signature is looked at, which also rules out algorithm confusion (an
    HS256 token "signed" with an RSA public key).
    """

    def __init__(
        self,
        secret: str,
        *,
        algorithms: Sequence[str] = ("HS256",),
        jwks_url: str = "",
        audience: str = "",
        issuer: str = "",
        leeway: float = 5.0,
        max_lifetime: float = 0,
    ) -> None:
        self._hmac = [a for a in algorithms if a.startswith("HS")]
        self._asym = [a for a in algorithms if not a.startswith("HS")]
        if self._hmac and not secret:
            raise ValueError("WADDLE_JWT_SECRET is not set: the edge cannot verify HS tokens")
        if self._asym and not jwks_url:
            raise ValueError("WADDLE_JWT_JWKS_URL is needed for RS/ES/PS algorithms")
        if self._hmac and len(secret.encode()) < 32:
            # RFC 7518 3.2: an HMAC key shorter than the hash is guessable.
            log.warning("WADDLE_JWT_SECRET is shorter than 32 bytes; use a longer random key")
        self._secret = secret
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300) if jwks_url else None
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway = leeway
        self._max_lifetime = max_lifetime  # 0: no limit

    async def verify(self, token: str) -> Identity:
        """The identity a token carries, or ``AuthError``."""
        return identity_from_claims(await self.verified_claims(token))

    async def verify_dev(self, token: str) -> Identity:
        """As ``verify``, for a token ``POST /dev/token`` minted (and only that)."""
        claims = await self.verified_claims(token)
        if claims.get(DEV_CLAIM) is not True:
            raise AuthError("invalid token (not a development token)")
        return identity_from_claims(claims)

    async def verified_claims(self, token: str) -> dict[str, Any]:
        """The claims of a token whose signature, algorithm, times, audience
        and issuer are acceptable; ``AuthError`` otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("invalid token (header)") from None
        alg = header.get("alg")
        key: Any
        if alg in self._hmac:
            key, algorithms = self._secret, self._hmac
        elif alg in self._asym and self._jwks is not None:
            try:
                # PyJWKClient fetches over blocking HTTP (cached afterwards).
                signing = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
            except jwt.PyJWKClientError as exc:
                raise AuthError(f"invalid token (key: {type(exc).__name__})") from None
            key, algorithms = signing.key, self._asym
        else:
            raise AuthError("invalid token (algorithm not allowed)")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                leeway=self._leeway,
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token ({type(exc).__name__})") from None
        exp = _numeric_date(claims, "exp")
        _numeric_date(claims, "nbf")
        _numeric_date(claims, "iat")
        if self._max_lifetime and exp > time.time() + self._max_lifetime + self._leeway:
            raise AuthError("invalid token (exp beyond the maximum token lifetime)")
        return claims


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    """A time claim as seconds since the epoch; 0 when absent.

    PyJWT accepts anything ``int()`` takes (strings, booleans, 10**400);
    here a NumericDate is a JSON number within +-MAX_NUMERIC_DATE (which
    also refuses NaN and the infinities that ``1e400`` decodes to).
    """
    value = claims.get(name)
    if value is None:
        return 0.0
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not -MAX_NUMERIC_DATE <= value <= MAX_NUMERIC_DATE
    ):
        raise AuthError(f"invalid token ({name})")
    return float(value)


def _text_claim(value: str, name: str, *, controls: bool = False) -> None:
    """Refuse what message fields refuse (NUL, text not encodable as UTF-8),
    and with ``controls`` every control character."""
    if has_nul(value) or has_surrogates(value) or (controls and has_control_chars(value)):
        raise AuthError(f"invalid token ({name})")


def identity_from_claims(claims: Mapping[str, Any]) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise AuthError("invalid token (sub)")
    _text_claim(sub, "sub", controls=True)
    username = claims.get("username", sub)
    if not isinstance(username, str) or not username.strip() or len(username) > 64:
        raise AuthError("invalid token (username)")
    _text_claim(username, "username", controls=True)
    perms = claims.get("permissions", [])
    if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
        raise AuthError("invalid token (permissions)")
    avatar = claims.get("avatar_url")
    if avatar is None:
        avatar = ""
    if not isinstance(avatar, str) or len(avatar) > 2048:
        raise AuthError("invalid token (avatar_url)")
    _text_claim(avatar, "avatar_url", controls=True)
    channels = claims.get("channels")
    if channels is not None and (
        not isinstance(channels, list) or not all(isinstance(c, str) for c in channels)
    ):
        raise AuthError("invalid token (channels)")
    for channel in channels or ():
        _text_claim(channel, "channels")
    return Identity(
        user_id=sub,
        username=username.strip(),
        permissions=_PERMISSION_SETS[frozenset(perms) & KNOWN_PERMISSIONS],
        avatar_url=avatar,
        channels=frozenset(channels) if channels is not None else None,
        expires_at=_numeric_date(claims, "exp"),
    )


def dev_user_id() -> str:
    """A fresh random user id (development tokens only): a display name never
    leads to anyone else's id."""
    return f"dev-{uuid.uuid4().hex}"


def dev_username(value: object) -> str:
    """The display name a development token is asked for, stripped;
    ``ValueError`` says (safely, to the client) why it cannot be one."""
    if not isinstance(value, str) or not 1 <= len(value.strip()) <= 64:
        raise ValueError("username must be 1 to 64 characters")
    if has_control_chars(value):
        raise ValueError("username must not contain control characters (such as NUL or newlines)")
    if has_surrogates(value):
        raise ValueError("username must not contain lone surrogates")
    return value.strip()


def mint_token(
    secret: str,
    *,
    user_id: str,
    username: str,
    permissions: Sequence[str] = ("read", "write"),
    ttl_seconds: float = 3600,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, int]:
    """Sign an HS256 token; return it and its expiry in epoch milliseconds."""
    exp = int(time.time() + ttl_seconds)
    claims: dict[str, Any] = {
        "sub": user_id,
        "username": username,
        "permissions": list(permissions),
        "exp": exp,
        "iat": int(time.time()),
        **(extra or {}),
    }
    return jwt.encode(claims, secret, algorithm="HS256"), exp * 1000
