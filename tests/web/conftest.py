"""The web tests' site: a migrated SQLite database with three users, a person under two IDs, a
misfiled study, links and a real CT image, and the app over it; argon2 made cheap."""

from __future__ import annotations

import pytest

from db.accounts import AccountStore
from db.engine import make_engine
from db.links import LinkStore
from db.migrate import upgrade
from db.store import IdentityStore
from dicom_node.config import settings_from_dict
from tests.helpers import corpus_path, node_config
from tests.test_priors import MISFILED, SAME, add_link, add_study
from tests.web.site import PASSWORDS
from web.app import create_app
from web.passwords import hash_password


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch):
    """argon2 at its production cost takes ~0.4 s a hash here; the tests need only its behaviour."""
    from argon2 import PasswordHasher

    from web import passwords

    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr(passwords, "_HASHER", cheap)
    monkeypatch.setattr(passwords, "_DUMMY", cheap.hash("not a password of anyone"))


@pytest.fixture
def site(tmp_path):
    """A migrated SQLite database with three users, a person under two IDs, a misfiled
    study, two open links and a real CT image; and the app over it."""
    config = node_config(tmp_path, web={"enabled": True})
    settings = settings_from_dict(config, base_dir=tmp_path)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    store, links, accounts = IdentityStore(engine), LinkStore(engine), AccountStore(engine)
    for name, (role, password) in PASSWORDS.items():
        accounts.add_user(name, hash_password(password), role)
    s = {"p1": add_study(store, "P100", "HOSP-A", name="DOE^JANE", birth="19700101", sex="F", date="20190310"),
         "p2": add_study(store, "P200", "HOSP-B", name="DOE^JANE", birth="19700101", sex="F", date="20200505"),
         "p3": add_study(store, "P300", "HOSP-B", name="DOE^JANE", birth="19700101", sex="F", date="20210101"),
         "wrong": add_study(store, "P100", "HOSP-A", name="ROE^RICHARD", birth="19550505", date="20200101")}
    ids = {"confirmed": add_link(links, SAME, s["p1"], s["p2"], 0.97),
           "open_same": add_link(links, SAME, s["p3"], s["p1"], 0.91, decision=None),
           "open_misfiled": add_link(links, MISFILED, s["wrong"], s["p1"], 0.88, decision=None)}
    from dicom_node.node import build

    assert build(settings, migrate=False).ingestor.ingest_file(corpus_path("explicit_le"), "TESTSCU").ok
    app = create_app(settings, engine, "k" * 64)
    yield {"app": app, "engine": engine, "links": links, "accounts": accounts, "studies": s, "ids": ids,
           "store": store, "settings": settings}
    engine.dispose()
