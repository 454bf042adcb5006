"""Shared fixtures: real hub and node processes, services that must exist in CI."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from tests.fleet import ThreadedWan

REQUIRE_SERVICES = os.environ.get("FOGLINE_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get("FOGLINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def require_service(name: str, host: str, port: int) -> None:
    """Skip when a service is absent, or fail when FOGLINE_REQUIRE_SERVICES=1."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        message = f"{name} is not reachable on {host}:{port}: {exc}"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import sqlalchemy as sa

    schema = f"fl_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://"))
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_db_args(request: pytest.FixtureRequest) -> list[str]:
    """`fogline hub` arguments for the embedded SQLite store and for PostgreSQL: the same
    suite runs against both."""
    if request.param == "postgresql":
        return ["--db", request.getfixturevalue("postgres_url")]
    return []


@pytest.fixture
def wan() -> Iterator[ThreadedWan]:
    """A WAN emulator on its own thread, for links a test can slow down or cut."""
    emulator = ThreadedWan()
    try:
        yield emulator
    finally:
        emulator.close()
