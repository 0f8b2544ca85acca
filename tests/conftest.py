"""Shared fixtures: databases (SQLite and PostgreSQL) and running nodes."""

from __future__ import annotations

import pytest

from db.engine import make_engine
from db.migrate import upgrade
from db.store import IdentityStore
from tests.helpers import (
    POSTGRES_ADMIN_URL,
    SMALL_COHORT,
    RunningNode,
    _drop_postgres_database,
    _postgres_database,
    make_cohort,
    node_config,
    write_toml,
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database URL: embedded SQLite, then the local PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
        return
    name = _postgres_database()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    _drop_postgres_database(name)


@pytest.fixture
def store(db_url) -> IdentityStore:
    engine = make_engine(db_url)
    upgrade(engine)
    yield IdentityStore(engine)
    engine.dispose()


@pytest.fixture
def start_node(tmp_path):
    """Factory: start_node(**config_sections) -> RunningNode; stopped at teardown."""
    nodes: list[RunningNode] = []

    def start(db_url: str | None = None, wait: bool = True, name: str = "node", **sections) -> RunningNode:
        config = node_config(tmp_path, db_url, **sections)
        node = RunningNode(write_toml(tmp_path / f"{name}.toml", config), config)
        nodes.append(node)
        return node.start(wait=wait)

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """8 persons x 2 visits x all modalities, small sizes, many injected errors (2 workers): the synth
    tests' cohort, also exported and audited by tests/test_privacy_audit.py."""
    return make_cohort(tmp_path_factory.mktemp("synth"), "small", SMALL_COHORT + ["--jobs", "2"])
