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

from edge.auth import AuthError, TokenVerifier, extract_token

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
