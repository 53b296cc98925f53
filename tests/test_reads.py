"""core/reads.py against a real PostgreSQL, without any actor: what the HTTP API reads."""

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from hydrod import store
from hydrod.core.reads import Reads


@pytest.fixture
def reads(database):
    with psycopg.connect(database) as conn:
        store.migrate(conn)
    pool = ConnectionPool(database, min_size=1, max_size=1, name="reads", open=True)
    yield Reads(pool, timeout=5)
    pool.close()


def register(dsn, hardware_id, base):
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        store.register_node(cur, hardware_id=hardware_id, node_type="ph", fw_version="1.0.0", capabilities=["ph"],
                            hardware_revision=None, name=None, wanted_uid=None, base=base,
                            seen_at=1_764_000_000.0)
        cur.execute("UPDATE nodes SET node_secret = %s, config = %s WHERE uid = %s",
                    ("ab" * 32, '{"node_secret": "cd", "channels": []}', base))


def test_nodes_are_read_in_uid_order_and_one_node_by_its_uid(reads, database):
    register(database, "esp32-000000000002", "nd-ph-b")
    register(database, "esp32-000000000001", "nd-ph-a")
    assert [n["uid"] for n in reads.nodes()] == ["nd-ph-a", "nd-ph-b"]
    node = reads.node("nd-ph-b")
    assert (node["hardware_id"], node["type"], node["capabilities"]) == ("esp32-000000000002", "ph", ["ph"])
    assert reads.node("nd-nobody") is None


def test_a_read_never_carries_the_node_secret_not_even_the_one_the_node_echoes(reads, database):
    register(database, "esp32-000000000001", "nd-ph-a")
    node = reads.node("nd-ph-a")
    assert "node_secret" not in node and node["config"] == {"channels": []}
