"""Colloquy's schema driven by a real Message DB client: message-db-py (PyPI).

The client calls `message_store.write_message` qualified and the read functions and the
`messages` table unqualified, so these tests also prove the search_path arrangements of
migration 0002. By default it connects as the `message_store` role, as Message DB's tools
do; one test connects as the database owner instead.
"""

from __future__ import annotations

import psycopg
import psycopg2.errors as pg2_errors  # message-db-py is built on psycopg2
import pytest
from message_db.client import MessageDB

from mdb_support import as_user, md_consumer_member


@pytest.fixture
def client(db_url):
    """A message-db-py client connected as Message DB's `message_store` role."""
    c = MessageDB.from_url(as_user(db_url, "message_store"), max_connections=4)
    try:
        yield c
    finally:
        c.connection_pool.closeall()


@pytest.fixture
def owner_client(db_url):
    """A message-db-py client connected as the database owner (not message_store), relying
    on the database-level search_path."""
    c = MessageDB.from_url(db_url, max_connections=4)
    try:
        yield c
    finally:
        c.connection_pool.closeall()


def test_write_and_read_a_stream(client, db_url):
    assert client.write("account-1", "Opened", {"owner": "ann"}, {"trace": "t1"}) == 0
    assert client.write("account-1", "Deposited", {"amount": 10}) == 1
    assert client.write("account-2", "Opened", {"owner": "bob"}) == 0

    messages = client.read_stream("account-1")
    assert [(m["type"], m["position"], m["data"]) for m in messages] == [
        ("Opened", 0, {"owner": "ann"}),
        ("Deposited", 1, {"amount": 10}),
    ]
    assert messages[0]["metadata"] == {"trace": "t1"}
    assert messages[1]["metadata"] is None
    assert messages[0]["global_position"] < messages[1]["global_position"]

    # paging through the client
    assert [m["position"] for m in client.read_stream("account-1", position=1)] == [1]
    assert [m["position"] for m in client.read_stream("account-1", no_of_messages=1)] == [0]

    # the messages really are in Colloquy's table
    with psycopg.connect(db_url) as c:
        assert c.execute(
            "SELECT count(*) FROM message_store.messages WHERE stream_name = 'account-1'"
        ).fetchone()[0] == 2


def test_expected_versions(client):
    assert client.write("account-1", "Opened", {}, expected_version=-1) == 0
    assert client.write("account-1", "Deposited", {}, expected_version=0) == 1
    assert client.write_batch(
        "account-1", [("Deposited", {"n": 1}), ("Withdrawn", {"n": 2}, {"m": 1})],
        expected_version=1,
    ) == 3

    with pytest.raises(ValueError) as exc:
        client.write("account-1", "Deposited", {}, expected_version=1)
    # the client surfaces "<sqlstate>-<first line of the server error>"
    assert str(exc.value) == (
        "P0001-ERROR:  Wrong expected version: 1 (Stream: account-1, Stream Version: 3)"
    )

    with pytest.raises(ValueError) as exc:
        client.write("account-2", "Opened", {}, expected_version=0)
    assert str(exc.value) == (
        "P0001-ERROR:  Wrong expected version: 0 (Stream: account-2, Stream Version: -1)"
    )

    # a failed batch writes nothing (one transaction)
    with pytest.raises(ValueError):
        client.write_batch("account-1", [("A", {}), ("B", {})], expected_version=2)
    assert [m["type"] for m in client.read_stream("account-1")] == [
        "Opened", "Deposited", "Deposited", "Withdrawn"
    ]


def test_read_last_message(client):
    client.write("account-1", "Opened", {"n": 0})
    client.write("account-1", "Deposited", {"n": 1})
    last = client.read_last_message("account-1")
    assert (last["type"], last["position"], last["data"]) == ("Deposited", 1, {"n": 1})
    assert client.read_last_message("account-404") is None


def test_read_category_with_position_and_batch(client):
    for i in range(6):
        client.write(f"account-{i % 3}", "Event", {"i": i})
        client.write("other-1", "Noise", {"i": i})
    messages = client.read_category("account")
    assert [m["data"]["i"] for m in messages] == list(range(6))
    assert all(m["stream_name"].startswith("account-") for m in messages)
    gps = [m["global_position"] for m in messages]
    assert gps == sorted(gps)

    page = client.read_category("account", position=gps[2], no_of_messages=2)
    assert [m["global_position"] for m in page] == gps[2:4]

    # the generic read() dispatches on the name
    assert [m["global_position"] for m in client.read("account")] == gps
    assert [m["position"] for m in client.read("account-0")] == [0, 1]


def test_consumer_groups(client):
    streams = [f"account-{i}" for i in range(24)] + ["account-3+snapshot"]
    for s in streams:
        client.write(s, "Event", {"stream": s})
    size = 3
    delivered = {}
    for member in range(size):
        messages = client.read_category(
            "account", consumer_group_member=member, consumer_group_size=size
        )
        got = sorted(m["stream_name"] for m in messages)
        assert got == sorted(s for s in streams if md_consumer_member(s, size) == member)
        assert got, f"member {member} got no streams"
        for m in messages:
            assert m["global_position"] not in delivered
            delivered[m["global_position"]] = member
    assert len(delivered) == len(streams)


def test_consumer_group_errors_come_from_the_server(client):
    # The client validates arguments itself in read_category; its generic read() passes
    # them straight to the server, which must reject them with Message DB's error.
    client.write("account-1", "Event", {})
    with pytest.raises(pg2_errors.RaiseException) as exc:
        client.read("account", consumer_group_member=3, consumer_group_size=3)
    assert "Consumer group member must be less than the group size " \
        "(Consumer Group Member: 3, Consumer Group Size: 3)" in str(exc.value)


def test_correlation(client):
    client.write("account-1", "Reply", {"n": 1}, {"correlationStreamName": "order-1"})
    client.write("account-2", "Reply", {"n": 2}, {"correlationStreamName": "shipping-1"})
    client.write("account-3", "Reply", {"n": 3}, {"correlationStreamName": "order-7+x"})
    client.write("account-4", "Reply", {"n": 4})
    sql = (
        "SELECT * FROM get_category_messages(%(stream_name)s, %(position)s, "
        "%(batch_size)s, correlation => 'order')"
    )
    messages = client.read("account", sql=sql)
    assert [m["data"]["n"] for m in messages] == [1, 3]
    assert [m["metadata"]["correlationStreamName"] for m in messages] == ["order-1", "order-7+x"]

    with pytest.raises(pg2_errors.RaiseException) as exc:
        client.read("account", sql=sql.replace("'order'", "'order-1'"))
    assert "Correlation must be a category (Correlation: order-1)" in str(exc.value)


def test_read_all_and_stream_identifiers(client):
    client.write("account-1", "A", {})
    client.write("order-1", "B", {})
    client.write("account-2", "C", {})
    # '$all' reads the unqualified `messages` table: needs message_store on the path
    everything = client.read("$all", position=0)
    assert [m["type"] for m in everything] == ["A", "B", "C"]
    assert client.stream_identifiers("account") == ["1", "2"]


def test_owner_role_uses_database_search_path(owner_client):
    assert owner_client.write("account-1", "Opened", {"x": 1}) == 0
    assert owner_client.write("account-1", "Closed", {}, expected_version=0) == 1
    assert [m["type"] for m in owner_client.read_stream("account-1")] == ["Opened", "Closed"]
    assert [m["type"] for m in owner_client.read_category("account")] == ["Opened", "Closed"]
    assert owner_client.read_last_message("account-1")["type"] == "Closed"
