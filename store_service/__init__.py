"""The store service: the only Waddle component that talks to the database.

It owns message append (idempotent, fenced, group-committed), replay after a
sequence or message id, recent messages, users and channel settings, and the
schema (Alembic migrations in ``store_service/migrations``).
"""
