"""Internal gRPC over mutual TLS: the stack works with certificates from
configuration, and a plaintext or certificate-less client is turned away."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.client import WsClient
from tests.support.stack import Stack, start_stack
from waddle_pb import store_pb2, store_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(folder: Path) -> dict[str, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("waddle test CA"))
        .issuer_name(_name("waddle test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("waddle service"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Stack, dict[str, Path]]]:
    tmp = tmp_path_factory.mktemp("tls")
    pki = make_pki(tmp)
    env = {
        "WADDLE_GRPC_TLS_CERT": str(pki["cert"]),
        "WADDLE_GRPC_TLS_KEY": str(pki["key"]),
        "WADDLE_GRPC_TLS_CA": str(pki["ca"]),
        "WADDLE_GRPC_TLS_CLIENT_AUTH": "1",
    }
    async with start_stack(tmp, env=env) as s:
        yield s, pki


async def test_chat_works_over_mutual_tls(tls_stack: tuple[Stack, dict[str, Path]]) -> None:
    stack, _ = tls_stack
    async with aiohttp.ClientSession() as http:
        a = await WsClient.connect(http, stack.ws_url("secure"), token=stack.token("a"))
        b = await WsClient.connect(http, stack.ws_url("secure"), token=stack.token("b"))
        assert (await a.recv())["type"] == "initial_state"
        assert (await b.recv())["type"] == "initial_state"
        await a.send({"type": "message", "content": "over TLS"})
        assert (await b.recv_message())["content"] == "over TLS"
        await a.close()
        await b.close()


async def _load(channel: grpc.aio.Channel) -> store_pb2.ChannelState:
    async with channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        result: store_pb2.ChannelState = await stub.LoadChannel(
            store_pb2.LoadChannelRequest(channel_id="probe"), timeout=3
        )
        return result


async def test_plaintext_and_certificateless_clients_are_refused(
    tls_stack: tuple[Stack, dict[str, Path]],
) -> None:
    stack, pki = tls_stack
    with pytest.raises(grpc.aio.AioRpcError):
        await _load(grpc.aio.insecure_channel(stack.store_address))
    anonymous = grpc.ssl_channel_credentials(pki["ca"].read_bytes())
    with pytest.raises(grpc.aio.AioRpcError):
        await _load(grpc.aio.secure_channel(stack.store_address, anonymous))
    mutual = grpc.ssl_channel_credentials(
        pki["ca"].read_bytes(), pki["key"].read_bytes(), pki["cert"].read_bytes()
    )
    state = await _load(grpc.aio.secure_channel(stack.store_address, mutual))
    assert state.channel_id == "probe"
