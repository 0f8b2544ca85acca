"""Several nodes, one archive: two `serve` processes (as on two receiver hosts) share one PostgreSQL
database and one storage folder. They start together on an empty database, receive parts of the
same study at once, and a kill -9 and restart of one loses nothing either acknowledged and leaves
the other's writes in progress alone. Each keeps its own candidate index."""

from __future__ import annotations

import re

import numpy as np
import pytest

from linkage.engine import node_index_dir
from linkage.search import MANIFEST, CandidateIndex
from tests.helpers import RunningNode, _drop_postgres_database, module_database, node_config, write_toml
from tests.test_crash_safety import Transfer, check_consistent, crash_during_transfer, make_instances, restart


@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_two_nodes_share_one_postgresql_database_and_storage_folder(tmp_path):
    url, database = module_database("postgresql", tmp_path)   # skips with a reason when no server answers
    nodes = []
    try:
        for name in ("a", "b"):
            config = node_config(tmp_path, url, node={"instance": f"host-{name}"}, storage={"min_free_bytes": 0})
            nodes.append(RunningNode(write_toml(tmp_path / f"{name}.toml", config), config))
        a, b = nodes
        assert a.storage == b.storage and a.port != b.port
        for node in nodes:                      # both migrate the empty database at once: they take turns
            node.start(wait=False)
        for node in nodes:
            node.wait_ready()

        sent = make_instances(tmp_path / "outbox", 90)      # one study, three series
        items = list(sent.items())
        to_a, to_b = items[0::2], items[1::2]               # every series arrives through both nodes
        through_b = Transfer(b.port, to_b)
        b_thread = through_b.start()
        through_a = crash_during_transfer(a, to_a, kill_after=15)     # kill -9 of node a mid-transfer

        # What each node's start-up clears is its own folder for writes in progress.
        (b.storage / "tmp" / "host-b" / "in-progress.part").write_bytes(b"b is writing this")
        (a.storage / "tmp" / "host-a" / "left-by-crash.part").write_bytes(b"a was writing this")
        restart(a, 1)
        assert re.search(r"removed \d+ partial writes", a.log())     # ours, and any the kill left
        assert not (a.storage / "tmp" / "host-a" / "left-by-crash.part").exists()
        assert (b.storage / "tmp" / "host-b" / "in-progress.part").read_bytes() == b"b is writing this"
        (b.storage / "tmp" / "host-b" / "in-progress.part").unlink()

        b_thread.join(60)
        assert through_b.error is None and not through_b.other, through_b.other
        assert through_b.acked == [uid for uid, _ in to_b], "node b refused or lost instances while a restarted"

        unacked = set(through_a.attempted) - set(through_a.acked)
        rest = [(uid, item) for uid, item in to_a if uid not in through_a.acked]
        resend = Transfer(a.port, rest)
        resend.run()
        assert resend.error is None and set(resend.acked) == {uid for uid, _ in rest}

        acked = set(through_a.acked) | set(through_b.acked) | set(resend.acked)
        assert acked == set(sent)
        rows = check_consistent(a, sent, acked, unacked)      # counts, files, hashes; nothing left in tmp/
        assert rows.keys() == sent.keys()
        assert "stored" in b.log() and "stored" in a.log()
    finally:
        for node in nodes:
            node.stop()
        if database:
            _drop_postgres_database(database)


def test_each_node_keeps_its_own_candidate_index_and_an_older_one_is_adopted(tmp_path):
    root = tmp_path / "linkage-index"
    saved = CandidateIndex()
    saved.add(("chest_xr", "m", "1"), np.array([7]), np.eye(1, 4, dtype=np.float32))
    saved.save(root)                                   # where an earlier version saved it
    ours = node_index_dir(root, "host-a")
    assert ours == root / "nodes" / "host-a" and not (root / MANIFEST).exists()
    assert 7 in CandidateIndex.load(ours).get(("chest_xr", "m", "1"))
    other = node_index_dir(root, "host-b")
    assert CandidateIndex.load(other) is None          # the other node builds its own from the database
    CandidateIndex().save(other)
    assert 7 in CandidateIndex.load(node_index_dir(root, "host-a")).get(("chest_xr", "m", "1"))
