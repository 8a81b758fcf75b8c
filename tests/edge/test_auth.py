"""Token verification: what is accepted, and every attack that must be refused."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edge.auth import (
    DEV_CLAIM,
    AuthError,
    TokenVerifier,
    dev_user_id,
    dev_username,
    extract_token,
    mint_token,
)

SECRET = "unit-test-secret-" + "0123456789abcdef" * 4
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "u1",
        "username": "Una",
        "permissions": ["read", "write"],
        "exp": int(time.time()) + 600,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def hs(**over: Any) -> str:
    return jwt.encode(claims(**over), SECRET, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def verify(token: str, **kw: Any) -> Any:
    return await TokenVerifier(SECRET, **kw).verify(token)


async def test_valid_hs256_token() -> None:
    ident = await verify(hs(avatar_url="https://a/b.png", channels=["x"]))
    assert ident.user_id == "u1" and ident.username == "Una"
    assert ident.permissions == {"read", "write"}
    assert ident.may_join("x") and not ident.may_join("y")


async def test_unknown_permissions_are_ignored() -> None:
    ident = await verify(hs(permissions=["read", "admin"]))
    assert ident.permissions == {"read"}


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(lambda: hs(exp=int(time.time()) - 60), id="expired"),
        pytest.param(lambda: hs(nbf=int(time.time()) + 600), id="not-yet-valid"),
        pytest.param(lambda: hs(sub=None), id="missing-sub"),
        pytest.param(lambda: hs(exp=None), id="missing-exp"),
        pytest.param(lambda: hs(sub=""), id="empty-sub"),
        pytest.param(lambda: hs(permissions="read"), id="permissions-not-list"),
        pytest.param(lambda: jwt.encode(claims(), "another-secret-0123456789abcdef-0123456789abcdef", algorithm="HS256"), id="bad-signature"),
        pytest.param(lambda: hs()[:-3] + "AAA", id="tampered"),
        pytest.param(
            lambda: b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            + "."
            + b64(json.dumps(claims()).encode())
            + ".",
            id="alg-none",
        ),
        pytest.param(lambda: jwt.encode(claims(), SECRET, algorithm="HS512"), id="unpinned-alg"),
        pytest.param(lambda: "not.a.jwt", id="garbage"),
    ],
)  # fmt: skip
async def test_refused_tokens(token: Any) -> None:
    with pytest.raises(AuthError):
        await verify(token())


async def test_audience_and_issuer_checked_when_configured() -> None:
    ok = hs(aud="waddle", iss="https://issuer")
    ident = await verify(ok, audience="waddle", issuer="https://issuer")
    assert ident.user_id == "u1"
    for bad in (
        hs(aud="other", iss="https://issuer"),
        hs(iss="https://issuer"),
        hs(aud="waddle", iss="evil"),
    ):
        with pytest.raises(AuthError):
            await verify(bad, audience="waddle", issuer="https://issuer")


def test_extract_token_from_header_or_subprotocol() -> None:
    assert extract_token({"Authorization": "Bearer abc"}) == "abc"
    assert extract_token({"Authorization": "bearer  abc "}) == "abc"
    assert extract_token({"Sec-WebSocket-Protocol": "waddle.v1, bearer.xyz"}) == "xyz"
    assert extract_token({"Sec-WebSocket-Protocol": "waddle.v1"}) is None
    assert extract_token({"Authorization": "Basic abc"}) is None
    assert extract_token({}) is None


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="WADDLE_JWT_SECRET"):
        TokenVerifier("", algorithms=["HS256"])
    with pytest.raises(ValueError, match="WADDLE_JWT_JWKS_URL"):
        TokenVerifier("", algorithms=["RS256"])


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key())
    )
    data.update({"kid": kid, "alg": alg, "use": "sig"})
    return data


@pytest_asyncio.fixture
async def jwks_url() -> AsyncIterator[str]:
    doc = {"keys": [_jwk(RSA_KEY, "rsa-1", "RS256"), _jwk(EC_KEY, "ec-1", "ES256")]}

    async def serve(_: web.Request) -> web.Response:
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/jwks.json", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/jwks.json"
    await runner.cleanup()


async def test_rs256_and_es256_via_jwks(jwks_url: str) -> None:
    def verifier() -> TokenVerifier:
        return TokenVerifier("", algorithms=["RS256", "ES256"], jwks_url=jwks_url)

    rs = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims(sub="u2"), EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    assert (await verifier().verify(rs)).user_id == "u1"
    assert (await verifier().verify(es)).user_id == "u2"
    # Unknown key id, and a key the JWKS does not hold.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bad in (
        jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "nope"}),
        jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "rsa-1"}),
    ):
        with pytest.raises(AuthError):
            await verifier().verify(bad)


async def test_algorithm_confusion_is_refused(jwks_url: str) -> None:
    """An HS256 token whose HMAC key is the server's RSA *public* key."""
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = b64(json.dumps(claims()).encode())
    import hashlib
    import hmac

    sig = b64(hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest())
    forged = f"{header}.{body}.{sig}"
    with pytest.raises(AuthError):
        await TokenVerifier("", algorithms=["RS256"], jwks_url=jwks_url).verify(forged)
    # Even with HS256 allowed too, the HMAC key is the secret, not the public key.
    with pytest.raises(AuthError):
        await TokenVerifier(SECRET, algorithms=["HS256", "RS256"], jwks_url=jwks_url).verify(forged)


# --- hostile claims in correctly signed tokens ----------------------------------

NOW = int(time.time())
HUGE = 10**400


def signed_payload(payload: str) -> str:
    """An HS256 token over raw JSON text (for literals json.dumps never writes)."""
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(payload.encode())
    sig = b64(hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest())
    return f"{header}.{body}.{sig}"


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        pytest.param({"sub": "u\x00"}, "sub", id="nul-sub"),
        pytest.param({"username": "Una\x00"}, "username", id="nul-username"),
        pytest.param({"sub": "\x00"}, "sub", id="nul-only-sub"),
        pytest.param({"avatar_url": "https://a/\x00.png"}, "avatar_url", id="nul-avatar"),
        pytest.param({"channels": ["ok", "x\x00"]}, "channels", id="nul-channel"),
        pytest.param({"sub": "u\x01"}, "sub", id="control-sub"),
        pytest.param({"username": "Una\x1b[31m"}, "username", id="escape-username"),
        pytest.param({"username": "Una\nEve"}, "username", id="newline-username"),
        pytest.param({"username": "Una\x7f"}, "username", id="del-username"),
        pytest.param({"username": "Una\x85"}, "username", id="c1-username"),
        pytest.param({"avatar_url": "https://a/\r\nb.png"}, "avatar_url", id="control-avatar"),
        pytest.param({"username": "Una\ud800"}, "username", id="surrogate-username"),
        pytest.param({"sub": "\udfff"}, "sub", id="surrogate-sub"),
        pytest.param({"channels": ["\ud83d"]}, "channels", id="surrogate-channel"),
        pytest.param({"avatar_url": 0}, "avatar_url", id="avatar-not-string"),
        pytest.param({"exp": HUGE}, "exp", id="exp-huge"),
        pytest.param({"exp": -HUGE}, "", id="exp-huge-negative"),
        pytest.param({"exp": 1e308}, "exp", id="exp-huge-float"),
        pytest.param({"exp": str(NOW + 600)}, "exp", id="exp-string"),
        pytest.param({"exp": float("inf")}, "", id="exp-infinity"),
        pytest.param({"nbf": HUGE}, "", id="nbf-huge"),
        pytest.param({"nbf": -HUGE}, "nbf", id="nbf-huge-negative"),
        pytest.param({"nbf": -1e308}, "nbf", id="nbf-huge-negative-float"),
        pytest.param({"nbf": True}, "nbf", id="nbf-boolean"),
        pytest.param({"iat": HUGE}, "", id="iat-huge"),
        pytest.param({"iat": -HUGE}, "iat", id="iat-huge-negative"),
        pytest.param({"iat": -1e308}, "iat", id="iat-huge-negative-float"),
        pytest.param({"iat": "0"}, "iat", id="iat-string"),
    ],
)
async def test_hostile_claims_are_refused(over: dict[str, Any], reason: str) -> None:
    with pytest.raises(AuthError) as info:
        await verify(hs(**over))
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param('{"sub": "u1", "exp": 1e400}', id="exp-literal-1e400"),
        pytest.param('{"sub": "u1", "exp": -1e400}', id="exp-literal-minus-1e400"),
        pytest.param('{"sub": "u1", "exp": NaN}', id="exp-nan"),
        pytest.param(f'{{"sub": "u1", "exp": {NOW + 600}, "nbf": -1e400}}', id="nbf-minus-1e400"),
        pytest.param(f'{{"sub": "u1", "exp": {NOW + 600}, "iat": -1e400}}', id="iat-minus-1e400"),
        pytest.param(f'{{"sub": "u1", "exp": {NOW + 600}, "iat": NaN}}', id="iat-nan"),
        pytest.param(f'{{"sub": "u1", "exp": {NOW + 600}, "nbf": NaN}}', id="nbf-nan"),
    ],
)
async def test_non_finite_time_claims_are_refused(payload: str) -> None:
    with pytest.raises(AuthError):
        await verify(signed_payload(payload))


async def test_text_claims_within_the_rules_are_accepted() -> None:
    ident = await verify(
        hs(
            sub="ü-\u200f-1",
            username=" Una \U0001f427\u202e ",
            avatar_url=None,
            channels=["général", "x"],
            iat=NOW,
            nbf=NOW - 10,
        )
    )
    assert ident.user_id == "ü-\u200f-1"
    assert ident.username == "Una \U0001f427\u202e"
    assert ident.avatar_url == "" and ident.channels == {"général", "x"}
    assert ident.expires_at == float(claims()["exp"])


async def test_maximum_token_lifetime() -> None:
    day = 86400
    within = hs(exp=NOW + day - 60)
    beyond = hs(exp=NOW + day + 600)
    assert (await verify(within, max_lifetime=day)).user_id == "u1"
    with pytest.raises(AuthError, match="lifetime"):
        await verify(beyond, max_lifetime=day)
    # 0 turns the check off; the NumericDate range still holds.
    far = NOW + 400 * 365 * day
    assert (await verify(hs(exp=far), max_lifetime=0)).expires_at == float(far)
    with pytest.raises(AuthError, match="exp"):
        await verify(hs(exp=HUGE), max_lifetime=0)


async def test_only_development_tokens_are_renewable() -> None:
    dev, _ = mint_token(SECRET, user_id="dev-1", username="Dee", extra={DEV_CLAIM: True})
    plain, _ = mint_token(SECRET, user_id="u2", username="Plain")
    ident = await TokenVerifier(SECRET).verify_dev(dev)
    assert (ident.user_id, ident.username) == ("dev-1", "Dee")
    assert (await TokenVerifier(SECRET).verify(plain)).user_id == "u2"
    with pytest.raises(AuthError, match="development"):
        await TokenVerifier(SECRET).verify_dev(plain)
    for marker in ("true", 1, "yes"):
        forged, _ = mint_token(SECRET, user_id="u3", username="X", extra={DEV_CLAIM: marker})
        with pytest.raises(AuthError):
            await TokenVerifier(SECRET).verify_dev(forged)


def test_dev_user_ids_are_fresh_and_names_are_checked() -> None:
    ids = {dev_user_id() for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("dev-") and len(i) <= 128 for i in ids)
    assert dev_username("  Alice ") == "Alice"
    assert dev_username("\U0001f427 é") == "\U0001f427 é"
    for bad in ("", "   ", "x" * 65, None, 5, ["a"]):
        with pytest.raises(ValueError, match="1 to 64"):
            dev_username(bad)
    for bad in ("al\x00ice", "al\nice", "\x1b[2J", "a\x85"):
        with pytest.raises(ValueError, match="control characters"):
            dev_username(bad)
    with pytest.raises(ValueError, match="surrogates"):
        dev_username("a\udc00")
