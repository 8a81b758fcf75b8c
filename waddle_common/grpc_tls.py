"""Optional TLS (and mutual TLS) for the internal gRPC hops.

Configured by ``WADDLE_GRPC_TLS_CERT``/``_KEY`` (this service's certificate
chain and key, PEM), ``WADDLE_GRPC_TLS_CA`` (the CA that signed the peers)
and ``WADDLE_GRPC_TLS_CLIENT_AUTH`` (servers require, and clients present,
certificates). With none set, the hops are plaintext, for a trusted network
or a service mesh that encrypts for us.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from waddle_common.settings import Settings


@dataclass(frozen=True, slots=True)
class GrpcTls:
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    client_auth: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> GrpcTls:
        def read(path: str, what: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None

        tls = cls(
            cert=read(settings.grpc_tls_cert, "WADDLE_GRPC_TLS_CERT"),
            key=read(settings.grpc_tls_key, "WADDLE_GRPC_TLS_KEY"),
            ca=read(settings.grpc_tls_ca, "WADDLE_GRPC_TLS_CA"),
            client_auth=settings.grpc_tls_client_auth,
        )
        if (tls.cert is None) != (tls.key is None):
            raise ValueError("WADDLE_GRPC_TLS_CERT and WADDLE_GRPC_TLS_KEY go together")
        if tls.client_auth and (tls.ca is None or tls.cert is None):
            raise ValueError("WADDLE_GRPC_TLS_CLIENT_AUTH needs a certificate, key and CA")
        return tls

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.cert is None or self.key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca if self.client_auth else None,
            require_client_auth=self.client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca is None:
            return None
        if self.client_auth:
            return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        return grpc.ssl_channel_credentials(self.ca)


def bind(server: grpc.aio.Server, address: str, tls: GrpcTls) -> int:
    """Listen on ``address``; return the bound port (0 when binding failed)."""
    creds = tls.server_credentials()
    if creds is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, creds))


def open_channel(
    address: str,
    tls: GrpcTls,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    creds = tls.channel_credentials()
    if creds is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, creds, options=list(options), interceptors=interceptors)
