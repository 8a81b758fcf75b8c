"""Every ``WADDLE_`` environment variable, in one place.

One settings class serves all three services so that the README has one
table and a value means the same thing wherever it is read. Defaults make
``make run`` work on a laptop; production overrides them through the
environment (the Helm chart's ConfigMap) and, for credentials, from files:
with ``WADDLE_SECRETS_DIR`` set, a file named after a variable (e.g.
``WADDLE_JWT_SECRET``) in that directory supplies its value, unless the
variable itself is set (the chart mounts its Secrets there).
"""

from __future__ import annotations

import os
import socket
from functools import cached_property
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)

SECRETS_DIR_VAR = "WADDLE_SECRETS_DIR"


def _default_edge_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Configuration read from ``WADDLE_*`` variables (see README)."""

    model_config = SettingsConfigDict(env_prefix="WADDLE_", extra="ignore", frozen=True)

    # --- edge ---------------------------------------------------------------
    edge_host: str = "127.0.0.1"
    edge_port: int = Field(8080, ge=0, le=65535)
    edge_id: str = Field(default_factory=_default_edge_id)
    # Processes sharing the edge port (SO_REUSEPORT); "auto": one per usable core.
    edge_workers: int = Field(1, ge=1, le=256)
    # With several workers: the supervisor's /metrics, /healthz, /readyz;
    # worker i's own at this port + 1 + i (0: free ports).
    edge_ops_port: int = Field(0, ge=0, le=65535)
    jwt_secret: str = ""
    jwt_algorithms: Annotated[list[str], NoDecode] = ["HS256"]
    jwt_jwks_url: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway_seconds: float = Field(5.0, ge=0, le=300)
    jwt_max_lifetime_seconds: int = Field(2592000, ge=0)  # 0: no limit
    allowed_origins: Annotated[list[str], NoDecode] = []
    edge_max_connections: int = Field(20000, ge=1)
    handshake_timeout_seconds: float = Field(10.0, gt=0, le=600)
    user_max_edge_connections: int = Field(200, ge=1)
    max_subscriptions: int = Field(100, ge=1)
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
    # While writes keep coming, a socket's frames go out at most this often (ms).
    edge_write_interval_ms: float = Field(20.0, ge=0, le=100)
    send_stall_seconds: float = Field(10.0, gt=0)
    replay_rate: float = Field(1000.0, gt=0)
    replay_burst: float = Field(5000.0, ge=1)
    edge_replay_rate: float = Field(10000.0, gt=0)
    edge_replay_burst: float = Field(50000.0, ge=1)
    shutdown_grace_seconds: float = Field(10.0, ge=0)

    # --- channel service ----------------------------------------------------
    channel_host: str = "127.0.0.1"
    channel_port: int = Field(50051, ge=0, le=65535)
    channel_metrics_port: int = Field(9101, ge=0, le=65535)
    channel_shards: Annotated[list[str], NoDecode] = ["127.0.0.1:50051"]
    # Membership from DNS (edge.membership): SRV records of a name like
    # "_grpc._tcp.waddle-channel.ns.svc.cluster.local", or "host:port" for
    # its A/AAAA records. Set, it wins over channel_shards (then only the
    # list used until the first answer).
    channel_shards_dns: str = ""
    channel_shards_dns_seconds: float = Field(5.0, gt=0, le=3600)
    dns_server: str = ""  # "ip" or "ip:port" to ask instead of the system's resolver
    shard_down_seconds: float = Field(3.0, gt=0, le=3600)
    shard_up_seconds: float = Field(10.0, ge=0, le=3600)
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
    presence_linger_seconds: float = Field(5.0, ge=0, le=3600)
    channel_idle_seconds: float = Field(30.0, ge=0, le=86400)  # 0: never hibernate

    # --- store service ------------------------------------------------------
    store_host: str = "127.0.0.1"
    store_port: int = Field(50061, ge=0, le=65535)
    store_metrics_port: int = Field(9102, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///var/waddle.db"
    db_pool_size: int = Field(10, ge=1)

    # --- all ----------------------------------------------------------------
    log_level: str = "info"
    # Read from the environment only (it says where the other values' files are).
    secrets_dir: str = ""
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    grpc_tls_ca: str = ""
    grpc_tls_client_auth: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then one file per variable in WADDLE_SECRETS_DIR."""
        sources = [init_settings, env_settings, dotenv_settings]
        secrets_dir = os.environ.get(SECRETS_DIR_VAR, "").strip()
        if secrets_dir:
            if not os.path.isdir(secrets_dir):
                raise ValueError(f"{SECRETS_DIR_VAR}={secrets_dir}: no such directory")
            sources.append(SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir))
        return (*sources, file_secret_settings)

    @field_validator("channel_shards", "jwt_algorithms", "allowed_origins", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("edge_workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return usable_cores()
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
