"""Every ``WADDLE_`` environment variable, in one place.

One settings class serves all three services so that the README has one
table and a value means the same thing wherever it is read. Defaults make
``make run`` work on a laptop; production overrides them through the
environment (the Helm chart's ConfigMap and Secret).
"""

from __future__ import annotations

import os
import socket
from functools import cached_property
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_edge_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Configuration read from ``WADDLE_*`` variables (see README)."""

    model_config = SettingsConfigDict(env_prefix="WADDLE_", extra="ignore", frozen=True)

    # --- edge ---------------------------------------------------------------
    edge_host: str = "127.0.0.1"
    edge_port: int = Field(8080, ge=0, le=65535)
    edge_id: str = Field(default_factory=_default_edge_id)
    jwt_secret: str = ""
    jwt_algorithms: Annotated[list[str], NoDecode] = ["HS256"]
    jwt_jwks_url: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway_seconds: float = Field(5.0, ge=0, le=300)
    allowed_origins: Annotated[list[str], NoDecode] = []
    edge_max_connections: int = Field(20000, ge=1)
    message_rate: float = Field(10.0, gt=0)
    message_burst: float = Field(30.0, ge=1)
    typing_rate: float = Field(4.0, gt=0)
    typing_burst: float = Field(10.0, ge=1)
    frame_rate: float = Field(50.0, gt=0)
    frame_burst: float = Field(100.0, ge=1)
    abuse_burst: float = Field(20.0, ge=1)
    dev_mode: bool = False
    dev_token_ttl_seconds: int = Field(3600, ge=60)
    heartbeat_seconds: float = Field(30.0, gt=0)
    max_frame_bytes: int = Field(32768, ge=1024)
    join_timeout_seconds: float = Field(5.0, gt=0)
    send_buffer_bytes: int = Field(1 << 20, ge=4096)
    shutdown_grace_seconds: float = Field(10.0, ge=0)

    # --- channel service ----------------------------------------------------
    channel_host: str = "127.0.0.1"
    channel_port: int = Field(50051, ge=0, le=65535)
    channel_metrics_port: int = Field(9101, ge=0, le=65535)
    channel_shards: Annotated[list[str], NoDecode] = ["127.0.0.1:50051"]
    channel_max_connections: int = Field(10000, ge=1)
    user_max_connections: int = Field(10, ge=1)
    online_users_limit: int = Field(1000, ge=1)
    presence_fanout_limit: int = Field(1000, ge=0)
    max_message_length: int = Field(4000, ge=1)
    recent_messages: int = Field(50, ge=0, le=500)
    store_address: str = "127.0.0.1:50061"
    store_timeout_seconds: float = Field(5.0, gt=0)
    publish_timeout_seconds: float = Field(10.0, gt=0)
    rejoin_grace_seconds: float = Field(5.0, ge=0)

    # --- store service ------------------------------------------------------
    store_host: str = "127.0.0.1"
    store_port: int = Field(50061, ge=0, le=65535)
    store_metrics_port: int = Field(9102, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///var/waddle.db"
    db_pool_size: int = Field(10, ge=1)

    # --- all ----------------------------------------------------------------
    log_level: str = "info"
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    grpc_tls_ca: str = ""
    grpc_tls_client_auth: bool = False

    @field_validator("channel_shards", "jwt_algorithms", "allowed_origins", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("channel_shards")
    @classmethod
    def _shards_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("WADDLE_CHANNEL_SHARDS needs at least one address")
        if len(set(value)) != len(value):
            raise ValueError("WADDLE_CHANNEL_SHARDS lists an address twice")
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        allowed = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256"}
        unknown = [a for a in value if a not in allowed]
        if unknown or not value:
            raise ValueError(f"WADDLE_JWT_ALGORITHMS: unsupported {unknown or 'empty list'}")
        return value

    @cached_property
    def shard_list(self) -> tuple[str, ...]:
        return tuple(self.channel_shards)
