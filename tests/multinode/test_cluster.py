"""Colloquy as many processes over a 3-node NATS JetStream cluster, losing a node.

The test starts, on loopback ports: three nats-server processes forming a JetStream
cluster, the project's Gemini double, and five processes of the real `colloquy` binary in
the external mode: two gateways, two agents, one projector + relay. Users work through
both gateways (messages, half of them asking the agent) while one agent and then one NATS
node are killed with SIGKILL and not brought back. Gemini calls pass through a proxy in
the test that holds each for two seconds, so the killed agent dies with runs in
flight: the other agent takes them over once the consumer redelivers them (30 s). Then:

- no accepted command is lost: every 2xx send is in the log (its message, and its run);
- JetStream holds each event of the log exactly once, in log order;
- every requested run ended exactly once, with one assistant reply at most;
- the read models equal a replay of the log (`colloquy replay --all --verify`).

The event stream and the agent's budget buckets have 3 replicas
(COLLOQUY_STREAM_REPLICAS=3), and the node killed is the stream's leader.

Needs (scripts/test sets them): COLLOQUY_TEST_BIN (the colloquy binary),
COLLOQUY_TEST_NATS_BIN (nats-server 2.10 or later), COLLOQUY_TEST_PG_ADMIN_URL.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest

BIN = os.environ.get("COLLOQUY_TEST_BIN")
NATS_BIN = os.environ.get("COLLOQUY_TEST_NATS_BIN")
PG_ADMIN = os.environ.get("COLLOQUY_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

WORKLOAD_SECONDS = 24
# The agent first, while everything is steady, so that it dies holding runs (after a node
# loss an agent may take no run for 10-15 s: new consumer leaders are elected, and a
# fetch sent to the dead node ends only at its client-side timeout).
KILL_AGENT_AT = 8
KILL_NATS_AT = 12
USERS = 4
CONVERSATIONS_PER_USER = 4

pytestmark = pytest.mark.skipif(
    not (BIN and NATS_BIN), reason="needs COLLOQUY_TEST_BIN and COLLOQUY_TEST_NATS_BIN (scripts/test sets them)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - retried until the deadline
            last = error
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


def http(method: str, url: str, body=None, token: str | None = None, timeout: float = 30):
    """(status, parsed JSON or None)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw) if raw else None
        except ValueError:
            return error.code, None


CALL_DELAY_SECONDS = 2.0


def slow_proxy(target: str) -> ThreadingHTTPServer:
    """A pass-through to `target` that holds every call for CALL_DELAY_SECONDS first."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server interface
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            time.sleep(CALL_DELAY_SECONDS)
            request = urllib.request.Request(target + self.path, data=body, method="POST")
            for name in ("content-type", "x-goog-api-key"):
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, content_type, payload = response.status, response.headers.get("content-type"), response.read()
            except urllib.error.HTTPError as error:
                status, content_type, payload = error.code, error.headers.get("content-type"), error.read()
            self.send_response(status)
            if content_type:
                self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Nats:
    """Just enough of the NATS protocol for JetStream API requests."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self._line()  # INFO
        self.sock.sendall(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
            b"SUB _INBOX.multinode 1\r\nPING\r\n"
        )
        while self._line() != b"PONG":
            pass

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("NATS closed the connection")
        self.buffer += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n + 2:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n + 2 :]
        return data

    def request(self, subject: str, payload: dict) -> dict:
        raw = json.dumps(payload).encode()
        self.sock.sendall(f"PUB {subject} _INBOX.multinode {len(raw)}\r\n".encode() + raw + b"\r\n")
        while True:
            line = self._line()
            if line.startswith(b"MSG "):
                return json.loads(self._take(int(line.split()[-1])))
            if line.startswith(b"HMSG "):
                header_len, total = (int(x) for x in line.split()[-2:])
                message = self._take(total)
                raise RuntimeError(f"no answer to {subject}: {message[:header_len]!r}")
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise RuntimeError(line.decode())

    def close(self):
        self.sock.close()


def headers_of(encoded: str) -> dict[str, str]:
    lines = base64.b64decode(encoded).decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if ": " in line)


class Cluster:
    """The processes of one test, started and stopped together."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self.processes[name] = process
        return process

    def kill(self, name: str):
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=5)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-25:]
            parts.append(f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts)


@pytest.fixture
def database():
    name = f"colloquy_test_mn_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"{base}/{name}".replace("postgresql://", "postgres://", 1)
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def cluster():
    root = Path(tempfile.mkdtemp(prefix="colloquy-multinode."))
    running = Cluster(root)
    try:
        yield running
    finally:
        running.stop_all()
        if os.environ.get("COLLOQUY_TEST_KEEP_LOGS"):
            print(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def start_nats(cluster: Cluster) -> list[dict]:
    nodes = [
        {"name": f"nats-{i}", "client": free_port(), "route": free_port(), "monitor": free_port()} for i in (1, 2, 3)
    ]
    routes = ", ".join(f"nats-route://127.0.0.1:{n['route']}" for n in nodes)
    for node in nodes:
        config = cluster.root / f"{node['name']}.conf"
        config.write_text(
            f"server_name: {node['name']}\n"
            f"listen: 127.0.0.1:{node['client']}\n"
            f"http: 127.0.0.1:{node['monitor']}\n"
            "max_payload: 4MB\n"
            f"jetstream {{ store_dir: \"{cluster.root / node['name']}\" }}\n"
            f"cluster {{ name: multinode, listen: 127.0.0.1:{node['route']}, routes: [{routes}] }}\n"
        )
        cluster.start(node["name"], [NATS_BIN, "-c", str(config)])
    for node in nodes:
        # Full health: JetStream up and the meta group has a leader this node follows.
        wait_for(
            f"{node['name']} healthy",
            lambda node=node: http("GET", f"http://127.0.0.1:{node['monitor']}/healthz")[0] == 200,
            timeout=60,
        )
    return nodes


def streams_on(node: dict) -> dict[str, dict]:
    """The streams a node holds a replica of, with their cluster info."""
    _, body = http("GET", f"http://127.0.0.1:{node['monitor']}/jsz?accounts=true&streams=true")
    found = {}
    for account in (body or {}).get("account_details", []):
        for stream in account.get("stream_detail", []) or []:
            found[stream["name"]] = stream
    return found


def projection_lags(body) -> list[int]:
    """Every `lag_events` in a /readyz body."""
    if isinstance(body, dict):
        found = [body["lag_events"]] if "lag_events" in body else []
        for value in body.values():
            found += projection_lags(value)
        return found
    if isinstance(body, list):
        return [lag for value in body for lag in projection_lags(value)]
    return []


def test_the_cluster_survives_losing_a_nats_node_and_an_agent(database, cluster):
    nodes = start_nats(cluster)
    fake_port = free_port()
    # One key per agent, so RunStarted (which records the key's label) says which agent
    # ran an attempt.
    cluster.start("fake-gemini", [BIN, "dev", "fake-gemini", "--bind", f"127.0.0.1:{fake_port}",
                                  "--keys", "key-1@fake-project,key-2@fake-project"])
    proxy = slow_proxy(f"http://127.0.0.1:{fake_port}")
    suffix = uuid.uuid4().hex[:8]
    stream = f"MN_{suffix}"
    env = {
        "DATABASE_URL": database,
        # One URL: NATS_URL takes a single server (async-nats does not split a list);
        # clients learn the cluster's other nodes from it and fail over to them.
        "NATS_URL": f"nats://127.0.0.1:{nodes[0]['client']}",
        "COLLOQUY_STREAM": stream,
        "COLLOQUY_SUBJECT_PREFIX": f"mn{suffix}",
        "COLLOQUY_STREAM_REPLICAS": "3",
        "COLLOQUY_JWT_SECRET": uuid.uuid4().hex,
        "COLLOQUY_COMMANDS_PER_SECOND": "1000",
        "COLLOQUY_COMMAND_BURST": "1000",
        "GEMINI_BASE_URL": f"http://127.0.0.1:{proxy.server_address[1]}",
        "GEMINI_RPM": "100000",
        "GEMINI_RPD": "10000000",
        "COLLOQUY_RETRY_DELAYS": "1s,2s,5s",
        "RUST_LOG": "info,sqlx=warn,async_nats=warn",
    }
    # Migrate once, so the five processes do not queue on the migration lock.
    subprocess.run([BIN, "migrate"], env={**os.environ, **env}, check=True, timeout=120,
                   stdout=subprocess.DEVNULL)
    roles = {
        "projector-relay": "projector,relay",
        "gateway-1": "gateway",
        "gateway-2": "gateway",
        "agent-1": "agent",
        "agent-2": "agent",
    }
    for name, role in roles.items():
        port = free_port()
        cluster.ports[name] = port
        keys = f"{name}=key-{name[-1]}@fake-project" if role == "agent" else "gateway=key-1@fake-project"
        cluster.start(name, [BIN, "serve", "--external", "--roles", role],
                      {**env, "COLLOQUY_BIND": f"127.0.0.1:{port}", "GEMINI_API_KEYS": keys})
    try:
        run_scenario(cluster, nodes, env, stream)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        proxy.shutdown()


def run_scenario(cluster: Cluster, nodes: list[dict], env: dict, stream: str):
    for name, port in cluster.ports.items():
        wait_for(f"{name} ready", lambda port=port: http("GET", f"http://127.0.0.1:{port}/readyz")[0] == 200,
                 timeout=90)
    gateways = [f"http://127.0.0.1:{cluster.ports['gateway-1']}", f"http://127.0.0.1:{cluster.ports['gateway-2']}"]

    # The node to kill: the event stream's leader. The budget buckets have as many
    # replicas as the stream (COLLOQUY_STREAM_REPLICAS), so losing any one node leaves
    # both the stream and the budgets available.
    buckets = (f"KV_{stream}_budgets", f"KV_{stream}_budgets_health")

    def placed():
        placement = {n["name"]: streams_on(n) for n in nodes}
        everywhere = all(stream in held and all(b in held for b in buckets) for held in placement.values())
        return placement if everywhere else None

    placement = wait_for("the event stream and the budget buckets on every node", placed, timeout=60)
    leader = next(s[stream]["cluster"].get("leader") for s in placement.values() if stream in s)
    victim = next((n for n in nodes if n["name"] == leader), nodes[0])

    # Users, registered and logged in through different gateways.
    tokens = []
    for i in range(USERS):
        email, password = f"user{i}-{uuid.uuid4().hex[:6]}@example.com", "correct horse battery staple"
        status, _ = http("POST", f"{gateways[i % 2]}/v1/auth/register", {"email": email, "password": password})
        assert status == 201, status
        status, body = http("POST", f"{gateways[(i + 1) % 2]}/v1/auth/login", {"email": email, "password": password})
        assert status == 200, (status, body)
        tokens.append(body["access_token"])

    accepted: list[dict] = []
    refused: list[tuple[int, object]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def user(index: int):
        token = tokens[index]
        rng = random.Random(index)
        conversations = []
        for c in range(CONVERSATIONS_PER_USER):
            status, body = http("POST", f"{gateways[c % 2]}/v1/conversations", {"title": f"c{c}"}, token)
            assert status == 201, (status, body)
            conversations.append(body["id"])
        n = 0
        while not stop.is_set():
            n += 1
            conversation = conversations[n % len(conversations)]
            run_agent = rng.random() < 0.5
            try:
                status, body = http("POST", f"{gateways[n % 2]}/v1/conversations/{conversation}/messages",
                                    {"text": f"message {n} of user {index}", "run_agent": run_agent}, token)
            except OSError as error:
                status, body = -1, str(error)
            with lock:
                if 200 <= status < 300:
                    accepted.append({"conversation": conversation, **body})
                else:
                    refused.append((status, body))
            time.sleep(0.05)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(USERS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(KILL_AGENT_AT)
    cluster.kill("agent-1")
    agent_killed_at = time.time()
    time.sleep(KILL_NATS_AT - KILL_AGENT_AT)
    cluster.kill(victim["name"])
    time.sleep(max(0, WORKLOAD_SECONDS - (time.monotonic() - started)))
    stop.set()
    for thread in threads:
        thread.join(timeout=60)

    runs = [a["run_id"] for a in accepted if a.get("run_id")]
    assert len(accepted) > 100 and len(runs) > 10, f"too little work got through: {len(accepted)} sends, {len(runs)} runs"
    # Refusals are allowed only for the one-active-run rule (409), never for an outage.
    assert all(status == 409 for status, _ in refused), f"refused: {refused[:5]}"

    db = psycopg.connect(env["DATABASE_URL"].replace("postgres://", "postgresql://", 1), autocommit=True)

    def terminal_counts() -> dict[str, int]:
        rows = db.execute(
            """SELECT stream_name, count(*) FILTER (WHERE type IN ('RunCompleted', 'RunFailed', 'RunCancelled'))
               FROM message_store.messages WHERE split_part(stream_name, '-', 1) = 'agentRun' GROUP BY stream_name"""
        ).fetchall()
        return {name.split("-", 1)[1]: count for name, count in rows}

    # Every run ends: one held by the killed agent comes back after the consumer's ack
    # wait (30 s) on the other agent.
    wait_for("every run to end", lambda: all(terminal_counts().get(r, 0) >= 1 for r in runs), timeout=150, every=1)

    # No accepted command lost.
    sent = {row[0] for row in db.execute(
        "SELECT data->>'messageId' FROM message_store.messages WHERE type = 'MessageSent'").fetchall()}
    lost = [a for a in accepted if a["message_id"] not in sent]
    assert not lost, f"{len(lost)} accepted messages are not in the log: {lost[:3]}"
    counts = terminal_counts()
    assert set(runs) <= set(counts), "an accepted run has no stream in the log"

    # Every run ended exactly once, with at most one assistant reply.
    assert all(count == 1 for count in counts.values()), {r: c for r, c in counts.items() if c != 1}
    taken_over = db.execute(
        """SELECT count(DISTINCT stream_name) FROM message_store.messages
           WHERE type = 'RunRetryScheduled' AND data->>'reason' LIKE 'the agent running attempt % stopped'"""
    ).fetchone()[0]
    by_agent = dict(db.execute(
        """SELECT data->>'keyLabel', extract(epoch FROM max(time AT TIME ZONE 'UTC')) FROM message_store.messages
           WHERE type = 'RunStarted' GROUP BY 1"""
    ).fetchall())
    assert taken_over >= 1, (
        f"no run was in flight on the killed agent: the kill tested nothing (last attempt started by each "
        f"agent, seconds before agent-1 was killed: "
        f"{ {k: round(agent_killed_at - float(v), 1) for k, v in by_agent.items()} })"
    )
    replies = db.execute(
        """SELECT data->>'runId', count(*) FROM message_store.messages
           WHERE type = 'MessageSent' AND data->>'author' = 'assistant' GROUP BY 1 HAVING count(*) > 1"""
    ).fetchall()
    assert not replies, f"runs answered twice: {replies}"

    # JetStream holds each event of the log once, in log order.
    log = [row[0] for row in db.execute("SELECT global_position FROM message_store.messages ORDER BY 1").fetchall()]
    survivor = next(n for n in nodes if n is not victim)

    def stream_positions():
        client = Nats(survivor["client"])
        try:
            info = client.request(f"$JS.API.STREAM.INFO.{stream}", {})
            state = info["state"]
            if state["messages"] < len(log):
                return None
            positions = []
            for seq in range(state["first_seq"], state["last_seq"] + 1):
                answer = client.request(f"$JS.API.STREAM.MSG.GET.{stream}", {"seq": seq})
                if "message" in answer:
                    positions.append(int(headers_of(answer["message"]["hdrs"])["Colloquy-Position"]))
            return positions
        finally:
            client.close()

    positions = wait_for("the stream to hold the whole log", stream_positions, timeout=60, every=1)
    assert positions == log, (
        f"stream holds {len(positions)} events, log {len(log)}; "
        f"duplicated {sorted({p for p in positions if positions.count(p) > 1})[:10]}, "
        f"missing {sorted(set(log) - set(positions))[:10]}"
    )

    # Read models equal a replay, once the projector has applied the whole log.
    projector = f"http://127.0.0.1:{cluster.ports['projector-relay']}/readyz"
    def caught_up():
        lags = projection_lags(http("GET", projector)[1])
        return lags and all(lag == 0 for lag in lags)

    wait_for("the projector to catch up", caught_up, timeout=60, every=0.5)
    verify = subprocess.run([BIN, "replay", "--all", "--verify"],
                            env={**os.environ, **env, "NATS_URL": f"nats://127.0.0.1:{survivor['client']}"},
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, f"replay --verify found differences:\n{verify.stdout}\n{verify.stderr}"
    db.close()
    print(
        f"{len(accepted)} sends accepted ({len(refused)} refused with 409), {len(runs)} runs "
        f"({taken_over} taken over from the killed agent), {len(log)} events; "
        f"killed agent-1 at {KILL_AGENT_AT} s and {victim['name']} (stream leader: {leader}) at {KILL_NATS_AT} s"
    )
