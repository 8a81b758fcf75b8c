"""The database schema as SQLAlchemy 2 declarative models.

Alembic migrations (``store_service/migrations``) are the source of truth for
what exists in a database; these models mirror them for queries and for
``alembic revision --autogenerate``. Change both together.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations can refer to them on every
# dialect (SQLite would otherwise leave them unnamed).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# CURRENT_TIMESTAMP is spelled the same on SQLite and PostgreSQL.
_NOW = text("CURRENT_TIMESTAMP")
# The rows of ix_messages_channel_id_thread_id_seq ("" is stored as NULL).
THREAD_PREDICATE = text("thread_id IS NOT NULL")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UserRow(Base):
    """The latest known profile of a user (written from message authors)."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    username: Mapped[str] = mapped_column(Text, nullable=False)
    avatar_url: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("''"))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )


class ChannelRow(Base):
    """A channel's sequence head (the fence) and its settings."""

    __tablename__ = "channels"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # NULL means "use the service default".
    max_connections: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=_NOW
    )


class MessageRow(Base):
    """One committed message. ``username`` is a snapshot taken at write time."""

    __tablename__ = "messages"
    __table_args__ = (
        # Also the index every recent/replay query walks.
        UniqueConstraint("channel_id", "seq"),
        # The idempotency key.
        UniqueConstraint("channel_id", "user_id", "client_msg_id"),
        # Thread pages and reply counts. Partial: most messages are in no
        # thread, and a query naming a thread_id implies the predicate.
        Index(
            "ix_messages_channel_id_thread_id_seq",
            "channel_id",
            "thread_id",
            "seq",
            postgresql_where=THREAD_PREDICATE,
            sqlite_where=THREAD_PREDICATE,
        ),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    channel_id: Mapped[str] = mapped_column(
        Text, ForeignKey("channels.id", ondelete="CASCADE"), nullable=False
    )
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    user_id: Mapped[str] = mapped_column(Text, nullable=False)
    username: Mapped[str] = mapped_column(Text, nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    thread_id: Mapped[str | None] = mapped_column(Text, nullable=True)
    client_msg_id: Mapped[str] = mapped_column(Text, nullable=False)
    created_at_ms: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ReadCursorRow(Base):
    """How far a user has read a channel: the highest seq read (never moves back).

    No foreign key to ``channels``: a cursor is keyed by ids alone, and
    writing one never creates a channel row.
    """

    __tablename__ = "read_cursors"
    __table_args__ = (PrimaryKeyConstraint("user_id", "channel_id"),)

    user_id: Mapped[str] = mapped_column(Text)
    channel_id: Mapped[str] = mapped_column(Text)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
