"""dcs-broker (rumqttd 0.20) against real clients: Mosquitto's CLI tools and paho-mqtt.

Each test starts its own broker on its own ports (see conftest.py).
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import (
    BROKER_BIN,
    HOST,
    MSG_TIMEOUT,
    PASSWORD,
    USER,
    free_port,
    mosq_pub,
    mosq_sub_once,
    run_broker_bin,
    unique,
    write_passwd,
)

# mosquitto_pub's exit code when the broker closes the socket instead of sending CONNACK.
MOSQ_CONNECTION_LOST = 7


def round_trip(paho, broker, **kw):
    """A fresh subscriber and publisher on `broker` exchange one QoS 1 message."""
    topic = unique("rt")
    sub = paho(broker, **kw)
    sub.connect()
    sub.subscribe(topic, qos=1)
    pub = paho(broker, **kw)
    pub.connect()
    pub.publish(topic, b"still-working", qos=1)
    msg = sub.get()
    assert (msg.topic, msg.payload) == (topic, b"still-working")
    pub.disconnect()
    sub.disconnect()


# ----------------------------------------------------------------- 1. mosquitto CLI


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub_sub(broker, mosq_subs, qos):
    topic = unique("mosq") + "/data"
    sub = mosq_subs(broker, topic, qos=qos)
    payload = f"hello qos {qos} \u00e9\u00e8"
    res = mosq_pub(broker, topic, "-q", str(qos), "-m", payload)
    assert res.returncode == 0, res.stderr
    msgs = sub.messages(1)
    assert len(msgs) == 1, sub.output
    m = msgs[0]
    assert (m.topic, m.payload, m.qos, m.retain) == (topic, payload, qos, False)


# ----------------------------------------------------------------- 2. paho -> paho


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_pub_sub(broker, paho, qos):
    topic = unique("paho") + "/x"
    sub = paho(broker)
    sub.connect()
    granted = sub.subscribe(topic + "/#", qos=qos)
    assert [int(g.value) for g in granted] == [qos]
    pub = paho(broker)
    pub.connect()
    payloads = [bytes([i]) * (i + 1) + b"\x00\xff" for i in range(3)]
    for p in payloads:
        pub.publish(topic + "/leaf", p, qos=qos)
    got = sub.get_n(3)
    assert [m.payload for m in got] == payloads
    assert {m.qos for m in got} == {qos}
    assert {m.topic for m in got} == {topic + "/leaf"}
    assert not any(m.retain for m in got)


# ----------------------------------------------------------------- 3. retained


def test_retained_set_and_clear(broker, paho):
    topic = unique("ret") + "/state"
    res = mosq_pub(broker, topic, "-q", "1", "-r", "-m", "on")
    assert res.returncode == 0, res.stderr

    # A subscriber arriving later gets it, flagged retained.
    _, msgs = mosq_sub_once(broker, topic, qos=1, wait_secs=int(MSG_TIMEOUT))
    assert len(msgs) == 1
    assert (msgs[0].payload, msgs[0].retain, msgs[0].qos) == ("on", True, 1)
    late = paho(broker)
    late.connect()
    late.subscribe(topic, qos=1)
    m = late.get()
    assert (m.payload, m.retain) == (b"on", True)

    # A live subscriber gets a retained publish as a normal message (retain flag off).
    res = mosq_pub(broker, topic, "-q", "1", "-r", "-m", "off")
    assert res.returncode == 0, res.stderr
    m = late.get()
    assert (m.payload, m.retain) == (b"off", False)
    _, msgs = mosq_sub_once(broker, topic, qos=1, wait_secs=int(MSG_TIMEOUT))
    assert [(x.payload, x.retain) for x in msgs] == [("off", True)]

    # Clearing: empty retained payload.
    res = mosq_pub(broker, topic, "-q", "1", "-r", "-n")
    assert res.returncode == 0, res.stderr
    m = late.get()  # live subscribers see the empty message
    assert m.payload == b""
    res, msgs = mosq_sub_once(broker, topic, qos=1, wait_secs=2)
    assert msgs == [], f"retained message not cleared: {msgs}"
    assert res.returncode == 27, (res.returncode, res.stderr)  # 27: -W timeout expired
    fresh = paho(broker)
    fresh.connect()
    fresh.subscribe(topic, qos=1)
    fresh.expect_nothing()


# ----------------------------------------------------------------- 4. last will

WILL_CLIENT = textwrap.dedent(
    """
    import sys, time
    import paho.mqtt.client as mqtt
    host, port, user, pw, cid, topic, payload, retain = sys.argv[1:9]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
    c.username_pw_set(user, pw)
    c.will_set(topic, payload, qos=1, retain=retain == "1")
    c.on_connect = lambda *a: print("CONNECTED", flush=True)
    c.connect(host, int(port), keepalive=60)
    c.loop_forever()
    """
)


def test_last_will_on_socket_close(broker, paho):
    """Socket closed without DISCONNECT: the will is published."""
    topic = unique("will") + "/status"
    watcher = paho(broker)
    watcher.connect()
    watcher.subscribe(topic, qos=1)

    # A paho client driven by hand (no network thread), so its socket can be closed
    # under it without paho sending DISCONNECT or reconnecting.
    victim = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("victim"))
    victim.username_pw_set(USER, PASSWORD)
    victim.will_set(topic, b"victim-died", qos=1, retain=False)
    connected = []
    victim.on_connect = lambda _c, _u, _f, rc, _p: connected.append(rc)
    victim.connect(broker.host, broker.mqtt_port, keepalive=60)
    deadline = time.monotonic() + MSG_TIMEOUT
    while not connected and time.monotonic() < deadline:
        victim.loop(timeout=0.1)
    assert connected and not connected[0].is_failure, connected
    watcher.expect_nothing(0.5)  # no will while it is connected
    victim.socket().close()

    m = watcher.get()
    assert (m.topic, m.payload, m.qos, m.retain) == (topic, b"victim-died", 1, False)


def test_last_will_retained_on_sigkill(broker, paho):
    """Client process SIGKILLed: the retained will reaches live and later subscribers."""
    topic = unique("will") + "/status"
    watcher = paho(broker)
    watcher.connect()
    watcher.subscribe(topic, qos=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", WILL_CLIENT, broker.host, str(broker.mqtt_port), USER,
         PASSWORD, unique("victim"), topic, "offline", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until CONNECTED or the script dies
        assert line.strip() == "CONNECTED", (line, proc.stderr.read() if proc.poll() is not None else "")
        watcher.expect_nothing(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    m = watcher.get()
    assert (m.payload, m.qos) == (b"offline", 1)
    _, msgs = mosq_sub_once(broker, topic, qos=1, wait_secs=int(MSG_TIMEOUT))
    assert [(x.payload, x.retain) for x in msgs] == [("offline", True)]


def test_no_will_after_clean_disconnect(broker, paho):
    topic = unique("will") + "/status"
    watcher = paho(broker)
    watcher.connect()
    watcher.subscribe(topic, qos=1)
    polite = paho(broker, will={"topic": topic, "payload": b"gone", "qos": 1})
    polite.connect()
    polite.disconnect()
    watcher.expect_nothing()


# ----------------------------------------------------------------- 5. persistent session


def test_persistent_session_gets_offline_messages(broker, paho):
    topic = unique("persist") + "/q"
    cid = unique("durable")
    n = 5

    first = paho(broker, client_id=cid, clean_session=False)
    first.connect()
    first.subscribe(topic, qos=1)
    first.disconnect()

    pub = paho(broker)
    pub.connect()
    sent = [f"offline-{i}".encode() for i in range(n)]
    for p in sent:
        pub.publish(topic, p, qos=1)

    again = paho(broker, client_id=cid, clean_session=False)
    flags = again.connect()
    got = again.get_n(n)
    received = [m.payload for m in got]
    assert flags.session_present, "broker forgot the session"
    assert received == sent, f"sent {sent}, received {received}"
    assert {m.qos for m in got} == {1}

    # The session still holds the subscription for messages sent while online.
    pub.publish(topic, b"online", qos=1)
    assert again.get().payload == b"online"


def test_clean_session_discards_offline_messages(broker, paho):
    """Control for the test above: with clean_session=True nothing is kept."""
    topic = unique("transient") + "/q"
    cid = unique("transient")
    first = paho(broker, client_id=cid, clean_session=True)
    first.connect()
    first.subscribe(topic, qos=1)
    first.disconnect()
    res = mosq_pub(broker, topic, "-q", "1", "-m", "lost")
    assert res.returncode == 0, res.stderr
    again = paho(broker, client_id=cid, clean_session=True)
    flags = again.connect()
    assert not flags.session_present
    again.expect_nothing()


# ----------------------------------------------------------------- 6. MQTT 5


def test_mqtt5_properties_pass_through(broker, paho):
    topic = unique("v5") + "/req"
    sub = paho(broker, protocol=mqtt.MQTTv5)
    sub.connect()
    sub.subscribe(topic, qos=1)
    pub = paho(broker, protocol=mqtt.MQTTv5)
    pub.connect()

    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("trace-id", "abc-123"), ("unit", "mV"), ("unit", "dup-key-ok")]
    props.ResponseTopic = topic + "/reply"
    props.CorrelationData = b"\x00\x01corr\xff"
    props.ContentType = "application/json"
    pub.publish(topic, b'{"v": 1}', qos=1, properties=props)

    m = sub.get()
    assert m.payload == b'{"v": 1}'
    assert m.qos == 1
    p = m.properties
    assert p.UserProperty == [("trace-id", "abc-123"), ("unit", "mV"), ("unit", "dup-key-ok")]
    assert p.ResponseTopic == topic + "/reply"
    assert p.CorrelationData == b"\x00\x01corr\xff"
    assert p.ContentType == "application/json"


def test_mqtt5_request_response(broker, paho):
    """A responder answers on the request's ResponseTopic echoing CorrelationData."""
    req_topic = unique("v5") + "/req"
    responder = paho(broker, protocol=mqtt.MQTTv5)
    responder.connect()
    responder.subscribe(req_topic, qos=1)
    requester = paho(broker, protocol=mqtt.MQTTv5)
    requester.connect()
    reply_topic = req_topic + "/reply/" + requester.client_id
    requester.subscribe(reply_topic, qos=1)

    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = b"req-42"
    requester.publish(req_topic, b"ping", qos=1, properties=props)
    req = responder.get()
    answer = Properties(PacketTypes.PUBLISH)
    answer.CorrelationData = req.properties.CorrelationData
    responder.publish(req.properties.ResponseTopic, b"pong", qos=1, properties=answer)
    rep = requester.get()
    assert (rep.topic, rep.payload, rep.properties.CorrelationData) == (reply_topic, b"pong", b"req-42")


# ----------------------------------------------------------------- 7. websocket


@pytest.mark.parametrize("path", ["/mqtt", "/", "/any/path"])
def test_websocket_round_trip(broker, paho, path):
    """paho's default path is /mqtt; the listener ignores the path."""
    topic = unique("ws") + "/t"
    sub = paho(broker, transport="websockets", ws_path=path)
    sub.connect()
    sub.subscribe(topic, qos=1)
    pub = paho(broker, transport="websockets", ws_path=path)
    pub.connect()
    pub.publish(topic, b"over-ws", qos=1)
    m = sub.get()
    assert (m.topic, m.payload, m.qos) == (topic, b"over-ws", 1)


def test_websocket_to_tcp_and_back(broker, paho, mosq_subs):
    topic = unique("ws") + "/bridge"
    tcp_sub = mosq_subs(broker, topic, qos=1)
    ws = paho(broker, transport="websockets")
    ws.connect()
    ws.subscribe(topic + "/down", qos=1)
    ws.publish(topic, b"ws->tcp", qos=1)
    msgs = tcp_sub.messages(1)
    assert [(x.payload, x.qos) for x in msgs] == [("ws->tcp", 1)], tcp_sub.output

    res = mosq_pub(broker, topic + "/down", "-q", "1", "-m", "tcp->ws")
    assert res.returncode == 0, res.stderr
    m = ws.get()
    assert (m.payload, m.qos) == (b"tcp->ws", 1)


# ----------------------------------------------------------------- 8. auth

BAD_LOGINS = {
    "wrong_password": (USER, "not-" + PASSWORD),
    "anonymous": (None, None),
    "unknown_user": ("mallory", PASSWORD),
    "empty_password": (USER, ""),
}


@pytest.mark.parametrize("case", list(BAD_LOGINS))
def test_auth_refused_mosquitto(broker, paho, case):
    user, pw = BAD_LOGINS[case]
    topic = unique("auth")
    watcher = paho(broker)
    watcher.connect()
    watcher.subscribe(topic, qos=1)

    creds = [] if user is None else ["-u", user, "-P", pw]
    cmd = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.mqtt_port), "-k", "10",
           "-t", topic, "-q", "1", "-m", "sneaky", *creds]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert res.returncode != 0, "mosquitto_pub was let in"
    assert res.returncode == MOSQ_CONNECTION_LOST, (res.returncode, res.stderr)
    watcher.expect_nothing()
    assert broker.alive()


@pytest.mark.parametrize("case", list(BAD_LOGINS))
@pytest.mark.parametrize("protocol", ["v311", "v5", "ws"])
def test_auth_refused_paho(broker, paho, case, protocol):
    user, pw = BAD_LOGINS[case]
    kw = {"v311": {}, "v5": {"protocol": mqtt.MQTTv5}, "ws": {"transport": "websockets"}}[protocol]
    c = paho(broker, username=user, password=pw, **kw)
    ok = c.connect(expect_ok=False, timeout=3)
    assert not ok, "paho got a successful CONNACK"


@pytest.mark.parametrize("protocol", ["v311", "v5", "ws"])
def test_auth_accepted(broker, paho, protocol):
    kw = {"v311": {}, "v5": {"protocol": mqtt.MQTTv5}, "ws": {"transport": "websockets"}}[protocol]
    round_trip(paho, broker, **kw)
    res = mosq_pub(broker, unique("auth"), "-q", "1", "-m", "x")
    assert res.returncode == 0, res.stderr


def test_auth_two_users_own_passwords(broker_factory, paho):
    """Several users in one file; each logs in with its own password only."""
    b = broker_factory(users={USER: PASSWORD, "bob": "hunter2"})
    ok = paho(b, username="bob", password="hunter2")
    ok.connect()
    swapped = paho(b, username="bob", password=PASSWORD)
    assert not swapped.connect(expect_ok=False, timeout=3)


# ----------------------------------------------------------------- 9. anonymous


def test_anonymous_allowed(broker_factory, paho, mosq_subs):
    b = broker_factory(anonymous=True)
    assert b.username is None
    topic = unique("anon")
    sub = mosq_subs(b, topic, qos=1)  # no -u/-P
    c = paho(b, username=None)
    c.connect()
    c.publish(topic, b"anon-hello", qos=1)
    assert [(m.payload, m.qos) for m in sub.messages(1)] == [("anon-hello", 1)]
    # No password file: any credentials are accepted too.
    res = mosq_pub(b, topic, "-u", "whoever", "-P", "whatever", "-q", "1", "-m", "x")
    assert res.returncode == 0, res.stderr
    assert [m.payload for m in sub.messages(1)] == ["x"]


# ----------------------------------------------------------------- 10. payload limit


def test_oversized_payload_closes_only_that_client(broker_factory, paho):
    b = broker_factory(limits={"max_payload_size": 2048, "segment_size": 65536})
    topic = unique("big")
    bystander = paho(b)
    bystander.connect()
    bystander.subscribe(topic + "/#", qos=1)

    offender = paho(b)
    offender.connect()
    offender.publish(topic + "/small", b"s" * 1000, qos=1)  # under the limit: delivered
    m = bystander.get()
    assert (m.topic, len(m.payload)) == (topic + "/small", 1000)

    info = offender.client.publish(topic + "/huge", b"H" * 10240, qos=1)
    assert offender.disconnected.wait(MSG_TIMEOUT), "oversized publisher not disconnected"
    assert not info.is_published(), "oversized QoS 1 publish was acknowledged"
    bystander.expect_nothing()

    # The bystander's connection is unaffected: publish + receive on it.
    bystander.publish(topic + "/after", b"after-the-big-one", qos=1)
    m = bystander.get()
    assert (m.topic, m.payload) == (topic + "/after", b"after-the-big-one")
    round_trip(paho, b)
    assert b.alive()


# ----------------------------------------------------------------- 11. garbage


def _raw(port: int, data: bytes, *, close: bool = True, linger: float = 0.2) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=5)
    if data:
        try:
            s.sendall(data)
        except OSError:
            pass  # the broker may already have dropped us
    if close:
        time.sleep(linger)
        s.close()
    return s


def test_garbage_on_mqtt_port(broker, paho):
    rnd = random.Random(1234)
    held = []
    try:
        for _ in range(5):
            _raw(broker.mqtt_port, bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 4096))))
        _raw(broker.mqtt_port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        # CONNECT announcing 30 bytes, sending 6, left open.
        held.append(_raw(broker.mqtt_port, b"\x10\x1e\x00\x04MQ", close=False))
        # CONNECT announcing a 256 MB packet (max remaining length), left open.
        held.append(_raw(broker.mqtt_port, b"\x10\xff\xff\xff\x7f", close=False))
        # Bad protocol name / level.
        _raw(broker.mqtt_port, b"\x10\x0c\x00\x04XXXX\x09\x02\x00\x0a\x00\x00")
        # A PUBLISH before CONNECT.
        _raw(broker.mqtt_port, b"\x30\x07\x00\x03a/bxyz")
        # A connection that sends nothing at all, left open.
        held.append(_raw(broker.mqtt_port, b"", close=False))

        # Normal clients work while the junk connections are still open.
        round_trip(paho, broker)
        res = mosq_pub(broker, unique("g"), "-q", "1", "-m", "ok")
        assert res.returncode == 0, res.stderr
        assert broker.alive()
    finally:
        for s in held:
            s.close()
    round_trip(paho, broker)
    assert broker.alive()


def test_garbage_on_mqtt5_port(broker, paho):
    rnd = random.Random(99)
    for _ in range(3):
        _raw(broker.mqtt5_port, bytes(rnd.randrange(256) for _ in range(512)))
    _raw(broker.mqtt5_port, b"\x10\x1e\x00\x04MQTT\x05")
    round_trip(paho, broker, protocol=mqtt.MQTTv5)
    assert broker.alive()


def test_garbage_on_websocket_port_closed(broker, paho):
    """Junk that the websocket handshake rejects, sent on closed connections."""
    rnd = random.Random(7)
    _raw(broker.ws_port, bytes(rnd.randrange(256) for _ in range(1024)), linger=0.5)
    _raw(broker.ws_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", linger=0.5)  # not an upgrade
    _raw(broker.ws_port, b"", linger=0.5)
    round_trip(paho, broker, transport="websockets")
    assert broker.alive()


# rumqttd 0.20 awaits the websocket upgrade inside its accept loop with no timeout, so
# one such socket kept every new websocket client out; dcs-broker's front end now
# terminates websockets itself, one task and one timeout per connection.
@pytest.mark.parametrize("opener", [b"", b"GET /mqtt HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "partial_upgrade"])
def test_idle_socket_on_websocket_port_does_not_block_new_clients(broker, paho, opener):
    """One TCP connection to the websocket port that never completes the HTTP upgrade
    must not keep other websocket clients out (the TCP listeners pass the same check in
    test_garbage_on_mqtt_port)."""
    idle = socket.create_connection((HOST, broker.ws_port), timeout=5)
    try:
        if opener:
            idle.sendall(opener)
        c = paho(broker, transport="websockets")
        ok = c.connect(expect_ok=False, timeout=8)
        assert ok, "websocket client could not connect while an idle socket is open"
    finally:
        idle.close()


def test_websocket_recovers_after_idle_socket_closes(broker, paho):
    """Once an idle socket is gone, ws works (as it does while one is open, above)."""
    idle = socket.create_connection((HOST, broker.ws_port), timeout=5)
    idle.close()
    round_trip(paho, broker, transport="websockets")


# ----------------------------------------------------------------- 12. bad configs


def _write_cfg(tmp_path, text: str, passwd: str | None = "users.passwd"):
    if passwd:
        write_passwd(tmp_path / passwd, {USER: PASSWORD})
    cfg = tmp_path / "broker.yaml"
    cfg.write_text(text)
    return cfg


def _ports_block() -> str:
    return f"listeners:\n  mqtt: {HOST}:{free_port()}\n  mqtt5: null\n  websocket: null\n"


@pytest.mark.parametrize("body,line,words", [
    ("auth:\n\tpassword_file: users.passwd\n", 6, "found character that cannot start any token"),
    ("auth:\n  password_file: users.passwd\n password_file: x\n", 7, "did not find expected key"),
    ("auth: {password_file: users.passwd\n", 6, "did not find expected ',' or '}'"),
], ids=["tab_indent", "bad_indent", "unclosed_brace"])
def test_config_broken_yaml(tmp_path, body, line, words):
    cfg = _write_cfg(tmp_path, _ports_block() + body)
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert str(cfg) in r.stderr, r.stderr
    assert f"line {line}" in r.stderr, r.stderr
    assert words in r.stderr, r.stderr
    assert r.stdout == ""


def test_config_unknown_key(tmp_path):
    cfg = _write_cfg(tmp_path, _ports_block() + "auth:\n  password_file: users.passwd\nlimits:\n  max_conections: 5\n")
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "unknown field `max_conections`" in r.stderr, r.stderr
    assert "line 8" in r.stderr, r.stderr
    assert "key `limits.max_conections`" in r.stderr, r.stderr
    assert "max_connections" in r.stderr  # lists the valid ones


def test_config_unknown_top_level_key(tmp_path):
    cfg = _write_cfg(tmp_path, _ports_block() + "auth:\n  password_file: users.passwd\nlimit:\n  max_connections: 5\n")
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "unknown field `limit`" in r.stderr, r.stderr


@pytest.mark.parametrize("addr", ["localhost", "127.0.0.1", "127.0.0.1:99999", "not an address:1883"])
def test_config_bad_listener_address(tmp_path, addr):
    cfg = _write_cfg(tmp_path, f"auth:\n  password_file: users.passwd\nlisteners:\n  mqtt: {addr}\n")
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "listeners.mqtt" in r.stderr, r.stderr
    assert "line 4" in r.stderr, r.stderr
    assert "invalid socket address" in r.stderr, r.stderr


def test_config_listener_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = _write_cfg(tmp_path, f"listeners:\n  mqtt: {HOST}:{port}\n  mqtt5: null\n  websocket: null\n"
                                   "auth:\n  password_file: users.passwd\n")
        r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode != 0
    assert f"cannot listen on {HOST}:{port} (mqtt listener)" in r.stderr, r.stderr


def test_config_missing_password_file(tmp_path):
    cfg = _write_cfg(tmp_path, _ports_block() + "auth:\n  password_file: nobody-here.passwd\n", passwd=None)
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode != 0, r.stderr
    assert "cannot read password file" in r.stderr, r.stderr
    assert str(tmp_path / "nobody-here.passwd") in r.stderr, r.stderr  # resolved next to the config
    assert "No such file" in r.stderr, r.stderr


def test_config_plaintext_password_line(tmp_path):
    (tmp_path / "users.passwd").write_text("# users\nalice:s3cret\n")
    cfg = _write_cfg(tmp_path, _ports_block() + "auth:\n  password_file: users.passwd\n", passwd=None)
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode != 0, r.stderr
    assert "users.passwd, line 2" in r.stderr, r.stderr
    assert "user `alice`" in r.stderr, r.stderr
    assert "clear-text passwords are not accepted" in r.stderr, r.stderr
    assert "s3cret" not in r.stderr, "the clear-text password is echoed"


def test_config_password_file_without_colon(tmp_path):
    (tmp_path / "users.passwd").write_text("alice\n")
    cfg = _write_cfg(tmp_path, _ports_block() + "auth:\n  password_file: users.passwd\n", passwd=None)
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode != 0
    assert "users.passwd, line 1" in r.stderr and "user:hash" in r.stderr, r.stderr


def test_config_no_auth(tmp_path):
    cfg = _write_cfg(tmp_path, _ports_block(), passwd=None)
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "key `auth`" in r.stderr and "nobody could connect" in r.stderr, r.stderr


def test_config_anonymous_with_password_file(tmp_path):
    cfg = _write_cfg(tmp_path, _ports_block() + "auth:\n  allow_anonymous: true\n  password_file: users.passwd\n")
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "auth.allow_anonymous" in r.stderr, r.stderr


def test_config_segment_smaller_than_payload(tmp_path):
    cfg = _write_cfg(tmp_path, _ports_block() + "auth:\n  password_file: users.passwd\n"
                     "limits:\n  max_payload_size: 2048\n  segment_size: 1024\n")
    r = run_broker_bin(["--config", str(cfg)])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "key `limits.segment_size`" in r.stderr and "line 9" in r.stderr, r.stderr


def test_config_file_missing(tmp_path):
    r = run_broker_bin(["--config", str(tmp_path / "absent.yaml")])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "absent.yaml" in r.stderr, r.stderr


def test_sigterm_stops_broker(broker, paho):
    round_trip(paho, broker)  # well past start-up
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(timeout=10) == 0, broker.stderr()
    assert "stopping broker" in broker.stderr() and "SIGTERM" in broker.stderr()


# The handlers are installed before readiness is announced: a SIGTERM right after the
# "listening" lines must still be a clean stop (as PID 1 in a container it would
# otherwise be ignored).
def test_sigterm_right_after_ready(broker_factory):
    for _ in range(10):
        b = broker_factory(mqtt5=False, websocket=False)
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(timeout=10) == 0, "killed by the signal, not a clean stop"


def test_binary_exists():
    assert BROKER_BIN.is_file(), BROKER_BIN
