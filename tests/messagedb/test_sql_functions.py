"""SQL-level tests of Colloquy's Message DB 1.3 interface (migrations/postgres/0002).

Each test runs against its own freshly migrated database (see conftest.py). Expected
values come from Message DB's documented behaviour, and hashes / consumer-group members
from independent Python re-implementations (mdb_support.py).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from decimal import ROUND_HALF_UP, Decimal

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from mdb_support import as_user, md_cardinal_id, md_consumer_member, md_hash_64

WAIT_TIMEOUT = 15.0  # seconds; bounds every wait in the concurrency tests

WRITE_SQL = (
    "SELECT message_store.write_message(%s::varchar, %s::varchar, %s::varchar, "
    "%s::jsonb, %s::jsonb, %s::bigint)"
)

MESSAGE_COLUMNS = [
    "id",
    "stream_name",
    "type",
    "position",
    "global_position",
    "data",
    "metadata",
    "time",
]


def write(conn, stream_name, type_="SomeType", data=None, metadata=None,
          expected_version=None, message_id=None):
    """write_message; returns (message id, returned position)."""
    message_id = message_id or str(uuid.uuid4())
    position = conn.execute(
        WRITE_SQL,
        (
            message_id,
            stream_name,
            type_,
            Jsonb(data if data is not None else {"attribute": "value"}),
            Jsonb(metadata) if metadata is not None else None,
            expected_version,
        ),
    ).fetchone()[0]
    return message_id, position


def rows(conn, query, params=()):
    cur = conn.execute(query, params)
    return [dict(zip([c.name for c in cur.description], r)) for r in cur.fetchall()]


def global_position_of(conn, message_id):
    return conn.execute(
        "SELECT global_position FROM message_store.messages WHERE id = %s::uuid",
        (message_id,),
    ).fetchone()[0]


# --------------------------------------------------------------------------------------
# write_message
# --------------------------------------------------------------------------------------


def test_write_message_returns_stream_positions_and_stores_the_message(conn):
    ids = []
    for expected in range(3):
        message_id, position = write(
            conn, "account-1", "Deposited", {"amount": expected}, {"meta": expected}
        )
        assert position == expected
        ids.append(message_id)

    _, other_position = write(conn, "account-2")
    assert other_position == 0  # positions are per stream

    stored = rows(
        conn,
        "SELECT id::text, stream_name, type, position, global_position, data, metadata, time "
        "FROM message_store.messages WHERE stream_name = 'account-1' ORDER BY position",
    )
    assert [r["id"] for r in stored] == ids
    assert [r["position"] for r in stored] == [0, 1, 2]
    assert [r["data"] for r in stored] == [{"amount": 0}, {"amount": 1}, {"amount": 2}]
    assert [r["metadata"] for r in stored] == [{"meta": 0}, {"meta": 1}, {"meta": 2}]
    assert all(r["type"] == "Deposited" for r in stored)
    gps = [r["global_position"] for r in stored]
    assert gps == sorted(gps) and len(set(gps)) == 3
    # time is UTC without time zone
    now_utc = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert all(abs((now_utc - r["time"]).total_seconds()) < 60 for r in stored)


def test_write_message_metadata_defaults_to_null(conn):
    position = conn.execute(
        "SELECT message_store.write_message(%s, 'thing-1', 'T', '{\"a\": 1}')",
        (str(uuid.uuid4()),),
    ).fetchone()[0]
    assert position == 0
    assert conn.execute(
        "SELECT metadata FROM message_store.messages WHERE stream_name = 'thing-1'"
    ).fetchone()[0] is None


def test_expected_version_minus_one_means_new_stream(conn):
    _, position = write(conn, "account-1", expected_version=-1)
    assert position == 0
    with pytest.raises(errors.RaiseException) as exc:
        write(conn, "account-1", expected_version=-1)
    assert exc.value.diag.message_primary == (
        "Wrong expected version: -1 (Stream: account-1, Stream Version: 0)"
    )


def test_expected_version_exact_match_appends(conn):
    for i in range(3):
        write(conn, "account-1")
    _, position = write(conn, "account-1", expected_version=2)
    assert position == 3


def test_expected_version_null_skips_the_check(conn):
    write(conn, "account-1")
    write(conn, "account-1")
    _, position = write(conn, "account-1", expected_version=None)
    assert position == 2


@pytest.mark.parametrize(
    "existing,expected_version,stream_version",
    [(0, 0, -1), (2, 0, 1), (2, 5, 1), (1, -1, 0)],
)
def test_wrong_expected_version_raises_message_db_error(conn, existing, expected_version,
                                                        stream_version):
    for _ in range(existing):
        write(conn, "account-7")
    with pytest.raises(errors.RaiseException) as exc:
        write(conn, "account-7", expected_version=expected_version)
    assert exc.value.sqlstate == "P0001"
    assert exc.value.diag.message_primary == (
        f"Wrong expected version: {expected_version} "
        f"(Stream: account-7, Stream Version: {stream_version})"
    )
    # nothing was written
    assert conn.execute(
        "SELECT count(*) FROM message_store.messages WHERE stream_name = 'account-7'"
    ).fetchone()[0] == existing


def test_duplicate_id_raises_unique_violation_on_messages_id(conn):
    message_id, _ = write(conn, "account-1")
    with pytest.raises(errors.UniqueViolation) as exc:
        write(conn, "account-2", message_id=message_id)
    assert exc.value.diag.constraint_name == "messages_id"
    assert conn.execute("SELECT count(*) FROM message_store.messages").fetchone()[0] == 1


def test_id_must_be_a_uuid(conn):
    with pytest.raises(errors.InvalidTextRepresentation):
        write(conn, "account-1", message_id="not-a-uuid")


STRANGE_STREAM_NAMES = [
    "category", "with space-1", "ünïcödé-ストリーム", "a-b-c+d+e", "-leadingDash", "x:y-1", "",
]
ANY_JSON = [{"nested": {"list": [1, 2, None]}}, [1, "two"], "a string", 42, None, {}]


def test_any_stream_name_and_any_json_are_accepted(conn):
    for stream_name in STRANGE_STREAM_NAMES:
        for expected_position, data in enumerate(ANY_JSON):
            message_id = str(uuid.uuid4())
            position = conn.execute(
                WRITE_SQL, (message_id, stream_name, "T", Jsonb(data), Jsonb(data), None)
            ).fetchone()[0]
            assert position == expected_position, (stream_name, data)
            stored = conn.execute(
                "SELECT stream_name, data, metadata FROM message_store.messages "
                "WHERE id = %s::uuid",
                (message_id,),
            ).fetchone()
            assert stored == (stream_name, data, data)


# --------------------------------------------------------------------------------------
# get_stream_messages
# --------------------------------------------------------------------------------------


def test_get_stream_messages_returns_message_rows_in_position_order(conn):
    ids = [write(conn, "account-1", f"T{i}", {"i": i}, {"m": i})[0] for i in range(3)]
    write(conn, "account-2")
    write(conn, "account-1+snapshot")  # a different stream

    cur = conn.execute("SELECT * FROM message_store.get_stream_messages('account-1')")
    assert [c.name for c in cur.description] == MESSAGE_COLUMNS
    result = cur.fetchall()
    assert [r[0] for r in result] == ids
    assert [r[1] for r in result] == ["account-1"] * 3
    assert [r[2] for r in result] == ["T0", "T1", "T2"]
    assert [r[3] for r in result] == [0, 1, 2]
    # data and metadata come back as JSON text (varchar), as in Message DB
    assert all(isinstance(r[5], str) for r in result)
    assert [json.loads(r[5]) for r in result] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [json.loads(r[6]) for r in result] == [{"m": 0}, {"m": 1}, {"m": 2}]
    assert all(isinstance(r[7], dt.datetime) and r[7].tzinfo is None for r in result)


def test_get_stream_messages_result_type_is_message_store_message(conn):
    conn.execute("SET search_path TO pg_catalog")  # so type names print schema-qualified
    ret = conn.execute(
        "SELECT pg_get_function_result('message_store.get_stream_messages"
        "(varchar, bigint, bigint, varchar)'::regprocedure)"
    ).fetchone()[0]
    assert ret == "SETOF message_store.message"
    args = conn.execute(
        "SELECT pg_get_function_arguments('message_store.get_stream_messages"
        "(varchar, bigint, bigint, varchar)'::regprocedure)"
    ).fetchone()[0]
    assert args == (
        'stream_name character varying, "position" bigint DEFAULT 0, '
        "batch_size bigint DEFAULT 1000, condition character varying DEFAULT NULL::character varying"
    )


def test_get_stream_messages_paging(conn):
    for i in range(7):
        write(conn, "account-1", data={"i": i})

    def page(position, batch_size):
        return [r[0] for r in conn.execute(
            "SELECT position FROM message_store.get_stream_messages('account-1', %s, %s)",
            (position, batch_size),
        )]

    assert page(0, 3) == [0, 1, 2]
    assert page(3, 3) == [3, 4, 5]
    assert page(6, 3) == [6]
    assert page(7, 3) == []
    assert page(2, -1) == [2, 3, 4, 5, 6]  # -1 = unlimited
    assert page(None, None) == list(range(7))  # NULLs mean the defaults
    with pytest.raises(psycopg.Error):
        page(0, -2)  # only -1 means unlimited; other negatives are a LIMIT error


def test_get_stream_messages_default_batch_size_is_1000(conn):
    conn.execute(
        "INSERT INTO message_store.messages (stream_name, position, type, data) "
        "SELECT 'big-1', g, 'T', '{}' FROM generate_series(0, 1000) g"
    )
    assert conn.execute(
        "SELECT count(*) FROM message_store.get_stream_messages('big-1')"
    ).fetchone()[0] == 1000
    assert conn.execute(
        "SELECT count(*) FROM message_store.get_stream_messages('big-1', 0, -1)"
    ).fetchone()[0] == 1001


def test_get_stream_messages_rejects_a_category(conn):
    with pytest.raises(errors.RaiseException) as exc:
        conn.execute("SELECT * FROM message_store.get_stream_messages('account')")
    assert exc.value.diag.message_primary == "Must be a stream name: account"


def test_get_stream_messages_condition_requires_the_setting(conn):
    write(conn, "account-1")
    with pytest.raises(errors.RaiseException) as exc:
        conn.execute(
            "SELECT * FROM message_store.get_stream_messages('account-1', "
            "condition => 'messages.position > 0')"
        )
    assert exc.value.diag.message_primary == "Retrieval with SQL condition is not activated"

    conn.execute("SET message_store.sql_condition = 'off'")
    with pytest.raises(errors.RaiseException) as exc:
        conn.execute(
            "SELECT * FROM message_store.get_stream_messages('account-1', "
            "condition => 'messages.position > 0')"
        )
    assert exc.value.diag.message_primary == "Retrieval with SQL condition is not activated"


def test_get_stream_messages_condition_filters_within_the_stream(conn):
    for t in ["A", "B", "A", "C"]:
        write(conn, "account-1", t)
    write(conn, "account-2", "A")
    conn.execute("SET message_store.sql_condition = on")
    result = conn.execute(
        "SELECT stream_name, position, type FROM message_store.get_stream_messages("
        "'account-1', 1, condition => 'messages.type = ''A'' OR messages.type = ''C''')"
    ).fetchall()
    # the condition is parenthesised: the OR cannot escape the stream/position filter
    assert result == [("account-1", 2, "A"), ("account-1", 3, "C")]


# --------------------------------------------------------------------------------------
# get_category_messages
# --------------------------------------------------------------------------------------


def test_get_category_messages_reads_all_streams_of_the_category_in_global_order(conn):
    write(conn, "account-1", "A")
    write(conn, "other-1", "X")
    write(conn, "account-2", "B")
    write(conn, "accountX-1", "X")  # another category sharing the prefix
    write(conn, "account:command-1", "X")  # another category
    write(conn, "account", "C")  # the stream named like the category is in it
    write(conn, "account-1+snap", "D")
    cur = conn.execute("SELECT * FROM message_store.get_category_messages('account')")
    assert [c.name for c in cur.description] == MESSAGE_COLUMNS
    result = [(r[1], r[2]) for r in cur.fetchall()]
    assert result == [
        ("account-1", "A"),
        ("account-2", "B"),
        ("account", "C"),
        ("account-1+snap", "D"),
    ]
    gps = [r[0] for r in conn.execute(
        "SELECT global_position FROM message_store.get_category_messages('account')"
    )]
    assert gps == sorted(gps)


def test_get_category_messages_position_is_an_inclusive_global_position(conn):
    for i in range(6):
        write(conn, f"account-{i % 2}", data={"i": i})
        write(conn, "noise-1")
    gps = [r[0] for r in conn.execute(
        "SELECT global_position FROM message_store.get_category_messages('account')"
    )]
    assert len(gps) == 6

    def page(position, batch_size):
        return [r[0] for r in conn.execute(
            "SELECT global_position FROM message_store.get_category_messages('account', %s, %s)",
            (position, batch_size),
        )]

    assert page(gps[2], 2) == gps[2:4]
    assert page(gps[2] + 1, 2) == gps[3:5]
    assert page(gps[-1] + 1, 10) == []
    assert page(1, -1) == gps
    assert page(None, None) == gps
    assert page(0, 3) == gps[:3]


def test_get_category_messages_rejects_a_stream_name(conn):
    with pytest.raises(errors.RaiseException) as exc:
        conn.execute("SELECT * FROM message_store.get_category_messages('account-1')")
    assert exc.value.diag.message_primary == "Must be a category: account-1"


def test_get_category_messages_correlation_filters_by_correlation_category(conn):
    write(conn, "account-1", "A", metadata={"correlationStreamName": "order-1"})
    write(conn, "account-2", "B", metadata={"correlationStreamName": "shipping-9"})
    write(conn, "account-3", "C", metadata={"correlationStreamName": "order-2+x"})
    write(conn, "account-4", "D")
    write(conn, "account-5", "E", metadata={"correlationStreamName": "order"})
    write(conn, "other-1", "F", metadata={"correlationStreamName": "order-1"})
    result = conn.execute(
        "SELECT type FROM message_store.get_category_messages('account', "
        "correlation => 'order')"
    ).fetchall()
    assert [r[0] for r in result] == ["A", "C", "E"]


def test_get_category_messages_correlation_must_be_a_category(conn):
    with pytest.raises(errors.RaiseException) as exc:
        conn.execute(
            "SELECT * FROM message_store.get_category_messages('account', "
            "correlation => 'order-1')"
        )
    assert exc.value.diag.message_primary == "Correlation must be a category (Correlation: order-1)"


def _write_consumer_group_fixture(conn):
    streams = []
    for i in range(30):
        streams.append(f"account-{i}")
        if i % 3 == 0:
            streams.append(f"account-{i}+snapshot")  # compound id: same cardinal id
    streams.append("account")  # no cardinal id
    for n, s in enumerate(streams):
        write(conn, s, data={"n": n})
    return streams


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_consumer_group_members_partition_streams_by_cardinal_id_hash(conn, size):
    streams = _write_consumer_group_fixture(conn)
    seen = {}
    for member in range(size):
        result = conn.execute(
            "SELECT stream_name, global_position FROM message_store.get_category_messages("
            "'account', 1, -1, consumer_group_member => %s, consumer_group_size => %s)",
            (member, size),
        ).fetchall()
        for stream_name, gp in result:
            assert gp not in seen, "a message was delivered to two members"
            seen[gp] = (stream_name, member)
        # each member gets exactly the streams Message DB's hash assigns to it
        expected = sorted(s for s in streams if md_consumer_member(s, size) == member)
        assert sorted(s for s, _ in result) == expected
        if size > 1:
            assert result, f"member {member} of {size} got nothing; partition is degenerate"
    # together the members read every stream that has a cardinal id, and nothing else
    assert sorted(s for s, _ in seen.values()) == sorted(s for s in streams if s != "account")
    # compound-id streams go to the member of their cardinal id
    by_stream = {s: m for s, m in seen.values()}
    for i in range(0, 30, 3):
        assert by_stream[f"account-{i}+snapshot"] == by_stream[f"account-{i}"]


def test_consumer_group_combines_with_correlation_and_batch(conn):
    for i in range(20):
        meta = {"correlationStreamName": f"order-{i}"} if i % 2 else None
        write(conn, f"account-{i}", data={"i": i}, metadata=meta)
    size = 2
    for member in range(size):
        result = conn.execute(
            "SELECT stream_name FROM message_store.get_category_messages("
            "'account', 1, 3, 'order', %s, %s)",
            (member, size),
        ).fetchall()
        expected = [
            f"account-{i}" for i in range(20)
            if i % 2 and md_consumer_member(f"account-{i}", size) == member
        ][:3]
        assert [r[0] for r in result] == expected


@pytest.mark.parametrize(
    "member,size,message",
    [
        (0, None, "Consumer group member and size must be specified "
                  "(Consumer Group Member: 0, Consumer Group Size: <NULL>)"),
        (None, 2, "Consumer group member and size must be specified "
                  "(Consumer Group Member: <NULL>, Consumer Group Size: 2)"),
        (0, 0, "Consumer group size must not be less than 1 "
               "(Consumer Group Member: 0, Consumer Group Size: 0)"),
        (-1, 2, "Consumer group member must not be less than 0 "
                "(Consumer Group Member: -1, Consumer Group Size: 2)"),
        (2, 2, "Consumer group member must be less than the group size "
               "(Consumer Group Member: 2, Consumer Group Size: 2)"),
        (3, 2, "Consumer group member must be less than the group size "
               "(Consumer Group Member: 3, Consumer Group Size: 2)"),
    ],
)
def test_consumer_group_argument_errors(conn, member, size, message):
    with pytest.raises(errors.RaiseException) as exc:
        conn.execute(
            "SELECT * FROM message_store.get_category_messages('account', 1, 1000, NULL, "
            "%s::bigint, %s::bigint)",
            (member, size),
        )
    assert exc.value.diag.message_primary == message


def test_get_category_messages_condition_requires_the_setting(conn):
    write(conn, "account-1")
    with pytest.raises(errors.RaiseException) as exc:
        conn.execute(
            "SELECT * FROM message_store.get_category_messages('account', "
            "condition => 'messages.position = 0')"
        )
    assert exc.value.diag.message_primary == "Retrieval with SQL condition is not activated"


def test_get_category_messages_condition_filters_when_activated(conn):
    for i in range(4):
        write(conn, f"account-{i}", "A" if i % 2 else "B")
    write(conn, "other-1", "A")
    with conn.transaction():
        conn.execute("SET LOCAL message_store.sql_condition = on")
        result = conn.execute(
            "SELECT stream_name FROM message_store.get_category_messages('account', "
            "condition => 'messages.type = ''A'' OR messages.stream_name = ''other-1''')"
        ).fetchall()
    assert [r[0] for r in result] == ["account-1", "account-3"]


# --------------------------------------------------------------------------------------
# get_last_stream_message, stream_version
# --------------------------------------------------------------------------------------


def test_get_last_stream_message_with_and_without_type(conn):
    write(conn, "account-1", "Opened", {"n": 0})
    write(conn, "account-1", "Deposited", {"n": 1})
    write(conn, "account-1", "Deposited", {"n": 2})
    write(conn, "account-1", "Withdrawn", {"n": 3})
    write(conn, "account-2", "Closed", {"n": 4})

    cur = conn.execute("SELECT * FROM message_store.get_last_stream_message('account-1')")
    assert [c.name for c in cur.description] == MESSAGE_COLUMNS
    last = cur.fetchall()
    assert len(last) == 1
    assert (last[0][1], last[0][2], last[0][3], json.loads(last[0][5])) == (
        "account-1", "Withdrawn", 3, {"n": 3}
    )

    last_deposit = conn.execute(
        "SELECT type, position, data FROM message_store.get_last_stream_message("
        "'account-1', 'Deposited')"
    ).fetchall()
    assert last_deposit == [("Deposited", 2, '{"n": 2}')]

    assert conn.execute(
        "SELECT * FROM message_store.get_last_stream_message('account-1', 'Closed')"
    ).fetchall() == []
    assert conn.execute(
        "SELECT * FROM message_store.get_last_stream_message('account-9')"
    ).fetchall() == []


def test_stream_version(conn):
    assert conn.execute(
        "SELECT message_store.stream_version('account-1')"
    ).fetchone()[0] is None
    for _ in range(3):
        write(conn, "account-1")
    write(conn, "account-2")
    assert conn.execute("SELECT message_store.stream_version('account-1')").fetchone()[0] == 2
    assert conn.execute("SELECT message_store.stream_version('account-2')").fetchone()[0] == 0


# --------------------------------------------------------------------------------------
# Stream name functions, hash, lock, version
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stream_name,category,id_,cardinal_id,is_category",
    [
        ("account", "account", None, None, True),
        ("account-123", "account", "123", "123", False),
        ("account-123+abc", "account", "123+abc", "123", False),
        ("account-123+abc+def", "account", "123+abc+def", "123", False),
        ("account:command-123+abc", "account:command", "123+abc", "123", False),
        ("account+x-1", "account+x", "1", "1", False),
        ("account-1-2", "account", "1-2", "1-2", False),  # only '+' splits an id
        ("account-", "account", "", "", False),
        ("", "", None, None, True),
    ],
)
def test_stream_name_functions(conn, stream_name, category, id_, cardinal_id, is_category):
    result = conn.execute(
        "SELECT message_store.category(%(s)s), message_store.id(%(s)s), "
        "message_store.cardinal_id(%(s)s), message_store.is_category(%(s)s)",
        {"s": stream_name},
    ).fetchone()
    assert result == (category, id_, cardinal_id, is_category)
    assert md_cardinal_id(stream_name) == cardinal_id  # the test oracle agrees


def test_stream_name_functions_on_null(conn):
    assert conn.execute(
        "SELECT message_store.category(NULL), message_store.id(NULL), "
        "message_store.cardinal_id(NULL), message_store.hash_64(NULL)"
    ).fetchone() == (None, None, None, None)
    # Message DB's is_category(NULL) is true (its IF treats NULL as not false)
    assert conn.execute("SELECT message_store.is_category(NULL)").fetchone()[0] is True


def test_hash_64_matches_message_db_definition(conn):
    values = ["account", "123", "account-123", "someStream-123", "ünïcödé", "", "x" * 500]
    values += [str(i) for i in range(40)]
    result = [
        conn.execute("SELECT message_store.hash_64(%s)", (v,)).fetchone()[0] for v in values
    ]
    assert result == [md_hash_64(v) for v in values]
    # both signs occur, so the signed interpretation is exercised
    assert any(h < 0 for h in result) and any(h > 0 for h in result)
    # and it is the same as Message DB's own SQL formulation
    assert conn.execute(
        "SELECT message_store.hash_64('account') = "
        "left('x' || md5('account'), 17)::bit(64)::bigint"
    ).fetchone()[0] is True


def test_acquire_lock_takes_the_category_lock_until_commit(db_url):
    key = md_hash_64("account")
    with psycopg.connect(db_url) as a, psycopg.connect(db_url, autocommit=True) as b:
        returned = a.execute("SELECT message_store.acquire_lock('account-123+x')").fetchone()[0]
        assert returned == key
        # held by A: another session cannot take it, for any stream of the category
        assert b.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()[0] is False
        a.commit()
        assert b.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()[0] is True


def test_message_store_version(conn):
    assert conn.execute("SELECT message_store.message_store_version()").fetchone()[0] == "1.3.0"


def test_function_signatures_match_message_db(conn):
    conn.execute("SET search_path TO pg_catalog")  # so type names print schema-qualified
    expected = {
        "write_message": (
            "id character varying, stream_name character varying, type character varying, "
            "data jsonb, metadata jsonb DEFAULT NULL::jsonb, expected_version bigint DEFAULT NULL::bigint",
            "bigint",
        ),
        "get_category_messages": (
            'category character varying, "position" bigint DEFAULT 1, '
            "batch_size bigint DEFAULT 1000, correlation character varying DEFAULT NULL::character varying, "
            "consumer_group_member bigint DEFAULT NULL::bigint, "
            "consumer_group_size bigint DEFAULT NULL::bigint, "
            "condition character varying DEFAULT NULL::character varying",
            "SETOF message_store.message",
        ),
        "get_last_stream_message": (
            "stream_name character varying, type character varying DEFAULT NULL::character varying",
            "SETOF message_store.message",
        ),
        "stream_version": ("stream_name character varying", "bigint"),
        "category": ("stream_name character varying", "character varying"),
        "id": ("stream_name character varying", "character varying"),
        "cardinal_id": ("stream_name character varying", "character varying"),
        "is_category": ("stream_name character varying", "boolean"),
        "hash_64": ("value character varying", "bigint"),
        "acquire_lock": ("stream_name character varying", "bigint"),
        "message_store_version": ("", "character varying"),
    }
    for name, (args, result) in expected.items():
        found = conn.execute(
            "SELECT pg_get_function_arguments(p.oid), pg_get_function_result(p.oid) "
            "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = 'message_store' AND p.proname = %s",
            (name,),
        ).fetchall()
        assert found == [(args, result)], name
    composite = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = 'message_store.message'::regclass AND a.attnum > 0 ORDER BY a.attnum"
    ).fetchall()
    assert composite == [
        ("id", "character varying"),
        ("stream_name", "character varying"),
        ("type", "character varying"),
        ("position", "bigint"),
        ("global_position", "bigint"),
        ("data", "character varying"),
        ("metadata", "character varying"),
        ("time", "timestamp without time zone"),
    ]


# --------------------------------------------------------------------------------------
# Summary views
# --------------------------------------------------------------------------------------


def _percent(count, total):
    return (Decimal(count) / Decimal(total) * 100).quantize(Decimal("0.01"), ROUND_HALF_UP)


def test_summary_views(conn):
    writes = [
        ("account-1", "Opened"), ("account-1", "Deposited"), ("account-1", "Deposited"),
        ("account-2", "Opened"), ("order-1", "Placed"), ("order-1", "Opened"),
    ]
    for stream_name, type_ in writes:
        write(conn, stream_name, type_)
    total = len(writes)

    def counted(key):
        counts = {}
        for w in writes:
            k = key(w)
            counts[k] = counts.get(k, 0) + 1
        return [(*k, c, _percent(c, total)) for k, c in sorted(counts.items())]

    cat = lambda s: s.split("-", 1)[0]  # noqa: E731
    expectations = {
        "stream_summary": counted(lambda w: (w[0],)),
        "type_summary": counted(lambda w: (w[1],)),
        "stream_type_summary": counted(lambda w: (w[0], w[1])),
        "type_stream_summary": counted(lambda w: (w[1], w[0])),
        "category_type_summary": counted(lambda w: (cat(w[0]), w[1])),
        "type_category_summary": counted(lambda w: (w[1], cat(w[0]))),
    }
    columns = {
        "stream_summary": ["stream_name", "message_count", "percent"],
        "type_summary": ["type", "message_count", "percent"],
        "stream_type_summary": ["stream_name", "type", "message_count", "percent"],
        "type_stream_summary": ["type", "stream_name", "message_count", "percent"],
        "category_type_summary": ["category", "type", "message_count", "percent"],
        "type_category_summary": ["type", "category", "message_count", "percent"],
    }
    for view, expected in expectations.items():
        cur = conn.execute(f"SELECT * FROM message_store.{view}")
        assert [c.name for c in cur.description] == columns[view], view
        assert cur.fetchall() == expected, view
    # e.g. 1 of 6 messages is 16.67 percent
    assert ("Placed", 1, Decimal("16.67")) in expectations["type_summary"]


def test_summary_views_are_empty_on_an_empty_store(conn):
    for view in ["stream_summary", "type_summary", "category_type_summary"]:
        assert conn.execute(f"SELECT * FROM message_store.{view}").fetchall() == []


# --------------------------------------------------------------------------------------
# Search path and the message_store role
# --------------------------------------------------------------------------------------


def test_unqualified_calls_work_on_a_new_connection(db_url):
    with psycopg.connect(db_url, autocommit=True) as c:
        assert c.execute("SHOW search_path").fetchone()[0] == '"$user", public, message_store'
        position = c.execute(
            "SELECT write_message(%s, 'account-1', 'Opened', '{\"a\": 1}')",
            (str(uuid.uuid4()),),
        ).fetchone()[0]
        assert position == 0
        assert c.execute(
            "SELECT type FROM get_stream_messages('account-1')"
        ).fetchall() == [("Opened",)]
        assert c.execute("SELECT count(*) FROM get_category_messages('account')").fetchone()[0] == 1
        assert c.execute("SELECT stream_version('account-1')").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
        assert c.execute("SELECT message_store_version()").fetchone()[0] == "1.3.0"


def test_message_store_role_has_message_db_search_path_and_privileges(db_url):
    with psycopg.connect(db_url, autocommit=True) as admin:
        assert admin.execute(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'message_store'"
        ).fetchone() == (True,)
    with psycopg.connect(as_user(db_url, "message_store"), autocommit=True) as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "message_store"
        assert c.execute("SHOW search_path").fetchone()[0] == "message_store, public"
        assert c.execute(
            "SELECT write_message(%s, 'account-1', 'Opened', '{}')", (str(uuid.uuid4()),)
        ).fetchone()[0] == 0
        assert c.execute(
            "SELECT write_message(%s, 'account-1', 'Deposited', '{}', NULL, 0)",
            (str(uuid.uuid4()),),
        ).fetchone()[0] == 1
        assert [r[0] for r in c.execute("SELECT type FROM get_category_messages('account')")] == [
            "Opened", "Deposited"
        ]
        assert c.execute("SELECT type FROM get_last_stream_message('account-1')").fetchone() == (
            "Deposited",
        )
        assert c.execute("SELECT acquire_lock('account-1')").fetchone()[0] == md_hash_64("account")
        assert c.execute("SELECT count(*) FROM type_summary").fetchone()[0] == 2
        assert c.execute("SELECT count(*) FROM messages").fetchone()[0] == 2
        # the log is append-only for the Message DB role
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("DELETE FROM messages")
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute("UPDATE messages SET type = 'x'")


# --------------------------------------------------------------------------------------
# Commit order
# --------------------------------------------------------------------------------------


def _wait_for_advisory_wait(observer, pid, thread):
    """Poll until backend `pid` waits on an advisory lock; bounded by WAIT_TIMEOUT."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while time.monotonic() < deadline:
        state = observer.execute(
            "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if state == ("Lock", "advisory"):
            return
        if not thread.is_alive():
            pytest.fail("the second writer finished without waiting for the first")
        time.sleep(0.02)
    pytest.fail(f"backend {pid} did not wait on the advisory lock within {WAIT_TIMEOUT}s")


class _Writer(threading.Thread):
    """Runs one write_message in its own transaction on connection `conn`."""

    def __init__(self, conn, stream_name, expected_version=None):
        super().__init__(daemon=True)
        self.conn = conn
        self.stream_name = stream_name
        self.expected_version = expected_version
        self.message_id = str(uuid.uuid4())
        self.result = None
        self.error = None

    def run(self):
        try:
            with self.conn.transaction():
                self.result = write(
                    self.conn, self.stream_name,
                    expected_version=self.expected_version, message_id=self.message_id,
                )[1]
        except Exception as exc:  # reported to the test thread
            self.error = exc


def _connect_bounded(db_url):
    c = psycopg.connect(db_url, autocommit=True)
    # a waiting writer gives up rather than hanging the suite
    c.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(WAIT_TIMEOUT * 2)}s",))
    return c


def test_second_writer_waits_for_first_commit_and_positions_follow_commit_order(db_url, conn):
    a = _connect_bounded(db_url)
    b = _connect_bounded(db_url)
    try:
        # A writes (different category from B, so only the global lock can order them)
        # and keeps its transaction open.
        a_tx = a.transaction()
        a_tx.__enter__()
        a_id, _ = write(a, "alpha-1")

        writer_b = _Writer(b, "beta-1")
        writer_b.start()
        _wait_for_advisory_wait(conn, b.info.backend_pid, writer_b)
        assert writer_b.is_alive() and writer_b.result is None

        # B's write is not visible and has no position yet; A commits
        a_tx.__exit__(None, None, None)
        writer_b.join(WAIT_TIMEOUT)
        assert not writer_b.is_alive(), "B did not finish after A committed"
        assert writer_b.error is None, writer_b.error
        assert writer_b.result == 0

        a_gp = global_position_of(conn, a_id)
        b_gp = global_position_of(conn, writer_b.message_id)
        assert a_gp < b_gp
        # and a category reader sees them in that (commit) order
        assert [r[0] for r in conn.execute(
            "SELECT stream_name FROM messages ORDER BY global_position"
        )] == ["alpha-1", "beta-1"]
    finally:
        a.close()
        b.close()


def test_version_check_is_serialised_with_raw_inserts(db_url, conn):
    """A raw INSERT (as the Rust batcher or any client might do) takes only the global
    ordering lock, not Message DB's category lock. write_message must take the global
    lock before reading the stream version: then it sees the committed insert and
    reports a wrong expected version (rather than passing the check on a stale version
    and failing later with a unique violation)."""
    a = _connect_bounded(db_url)
    b = _connect_bounded(db_url)
    try:
        a_tx = a.transaction()
        a_tx.__enter__()
        a.execute(
            "INSERT INTO message_store.messages (stream_name, position, type, data) "
            "VALUES ('race-1', 0, 'Raw', '{}')"
        )

        writer_b = _Writer(b, "race-1", expected_version=-1)
        writer_b.start()
        _wait_for_advisory_wait(conn, b.info.backend_pid, writer_b)

        a_tx.__exit__(None, None, None)
        writer_b.join(WAIT_TIMEOUT)
        assert not writer_b.is_alive(), "B did not finish after A committed"
        assert isinstance(writer_b.error, errors.RaiseException), repr(writer_b.error)
        assert writer_b.error.diag.message_primary == (
            "Wrong expected version: -1 (Stream: race-1, Stream Version: 0)"
        )
        assert conn.execute(
            "SELECT count(*) FROM messages WHERE stream_name = 'race-1'"
        ).fetchone()[0] == 1
    finally:
        a.close()
        b.close()


def test_concurrent_writers_to_one_stream_with_expected_versions(db_url, conn):
    """Two writers race on the same stream with the same expected version: exactly one
    wins, the other gets Message DB's wrong-version error."""
    write(conn, "account-1")
    a = _connect_bounded(db_url)
    b = _connect_bounded(db_url)
    try:
        a_tx = a.transaction()
        a_tx.__enter__()
        _, a_pos = write(a, "account-1", expected_version=0)
        assert a_pos == 1

        writer_b = _Writer(b, "account-1", expected_version=0)
        writer_b.start()
        _wait_for_advisory_wait(conn, b.info.backend_pid, writer_b)
        a_tx.__exit__(None, None, None)
        writer_b.join(WAIT_TIMEOUT)
        assert not writer_b.is_alive()
        assert isinstance(writer_b.error, errors.RaiseException), repr(writer_b.error)
        assert writer_b.error.diag.message_primary == (
            "Wrong expected version: 0 (Stream: account-1, Stream Version: 1)"
        )
    finally:
        a.close()
        b.close()


def test_acquire_lock_then_write_cannot_deadlock_with_another_writer(db_url, conn):
    """A client may call acquire_lock and then write_message in one transaction. Because
    acquire_lock takes the global ordering lock before the category lock (the order
    write_message uses), a concurrent write_message to the same category waits instead
    of deadlocking, and positions still follow commit order."""
    a = _connect_bounded(db_url)
    b = _connect_bounded(db_url)
    try:
        a_tx = a.transaction()
        a_tx.__enter__()
        a.execute("SELECT message_store.acquire_lock('account-1')")

        writer_b = _Writer(b, "account-2")
        writer_b.start()
        _wait_for_advisory_wait(conn, b.info.backend_pid, writer_b)

        # would be a deadlock (40P01) if the two paths locked in different orders
        a_id, a_pos = write(a, "account-1")
        assert a_pos == 0
        a_tx.__exit__(None, None, None)

        writer_b.join(WAIT_TIMEOUT)
        assert not writer_b.is_alive(), "B did not finish after A committed"
        assert writer_b.error is None, repr(writer_b.error)
        assert global_position_of(conn, a_id) < global_position_of(conn, writer_b.message_id)
    finally:
        a.close()
        b.close()
