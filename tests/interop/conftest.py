"""Fixtures for the dcs-broker interoperability tests.

Every test gets brokers of its own (own temp dir, own free ports), so tests are
order-free and can run in parallel. Clients used: Mosquitto's command-line tools and
paho-mqtt 2.x.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("DCS_BIN_DIR") or REPO_ROOT / "target" / "debug").resolve()
BROKER_BIN = BIN_DIR / "dcs-broker"

HOST = "127.0.0.1"
USER = "alice"
PASSWORD = "s3cret"

START_TIMEOUT = 15.0  # broker start, slow shared machine
MSG_TIMEOUT = 10.0  # waiting for a message that should come
QUIET_WINDOW = 1.5  # waiting for a message that should not come
TOOL_TIMEOUT = 20.0  # hard cap on one mosquitto_pub/sub run


_next_port = 0


def free_port() -> int:
    """A loopback port free for TCP and UDP, below the kernel's ephemeral range (port 0
    hands out ports from that range, where outgoing connections' source ports come from
    too, so a released port can be taken before the server binds it). Same walk as the
    Rust tests' `dcs_shared::testing::free_port`, started elsewhere (by pid)."""
    global _next_port
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    ephemeral_low = min(max(ephemeral_low, 16384), 65535)
    low, span = 10000, ephemeral_low - 10000
    start = os.getpid() % span
    for _ in range(span):
        port = low + (start + _next_port) % span
        _next_port += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                t.bind((HOST, port))
                u.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def unique(prefix: str = "t") -> str:
    """A topic/client-id fragment unique to this test run."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- broker


@dataclass
class Broker:
    host: str
    mqtt_port: int | None
    mqtt5_port: int | None
    ws_port: int | None
    username: str | None
    password: str | None
    workdir: Path
    config_path: Path
    proc: subprocess.Popen
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "broker.stderr"

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def auth_args(self) -> list[str]:
        """mosquitto_pub/sub credentials arguments (none for an anonymous broker)."""
        if self.username is None:
            return []
        return ["-u", self.username, "-P", self.password]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def write_passwd(path: Path, users: dict[str, str]) -> None:
    first = True
    for user, pw in users.items():
        args = ["mosquitto_passwd", "-b"] + (["-c"] if first else []) + [str(path), user, pw]
        subprocess.run(args, check=True, capture_output=True, timeout=30)
        first = False


def yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def render_config(listeners: dict, auth: dict, limits: dict, meters_interval_secs: int) -> str:
    lines = ["listeners:"]
    lines += [f"  {k}: {yaml_scalar(v)}" for k, v in listeners.items()]
    lines.append("auth:")
    lines += [f"  {k}: {yaml_scalar(v)}" for k, v in auth.items()]
    if limits:
        lines.append("limits:")
        lines += [f"  {k}: {yaml_scalar(v)}" for k, v in limits.items()]
    lines.append(f"meters_interval_secs: {meters_interval_secs}")
    return "\n".join(lines) + "\n"


def run_broker_bin(args: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
    """Runs dcs-broker to completion (for config errors)."""
    assert BROKER_BIN.exists(), f"{BROKER_BIN} not built (set DCS_BIN_DIR)"
    return subprocess.run([str(BROKER_BIN), *args], capture_output=True, text=True, timeout=timeout)


class BrokerFactory:
    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._brokers: list[Broker] = []

    def __call__(
        self,
        *,
        anonymous: bool = False,
        users: dict[str, str] | None = None,
        limits: dict | None = None,
        mqtt5: bool = True,
        websocket: bool = True,
        meters_interval_secs: int = 0,
    ) -> Broker:
        assert BROKER_BIN.exists(), f"{BROKER_BIN} not built (set DCS_BIN_DIR)"
        users = {USER: PASSWORD} if users is None else users
        last_err = ""
        # Free ports are picked, released, then bound by the broker: another process can
        # grab one in between. Retry on that (and only that).
        for _attempt in range(3):
            workdir = self._tmp.mktemp("broker")
            auth: dict = {}
            if anonymous:
                auth["allow_anonymous"] = True
            else:
                auth["allow_anonymous"] = False
                write_passwd(workdir / "users.passwd", users)
                auth["password_file"] = "users.passwd"  # relative to the config file
            ports = {"mqtt": free_port(), "mqtt5": free_port() if mqtt5 else None,
                     "websocket": free_port() if websocket else None}
            listeners = {k: (f"{HOST}:{p}" if p else None) for k, p in ports.items()}
            config_path = workdir / "broker.yaml"
            config_path.write_text(render_config(listeners, auth, limits or {}, meters_interval_secs))
            broker = self._start(workdir, config_path, ports, anonymous, users)
            if isinstance(broker, Broker):
                self._brokers.append(broker)
                return broker
            last_err = broker
            if "cannot listen on" not in last_err:
                break
        pytest.fail(f"dcs-broker did not start:\n{last_err}")

    def _start(self, workdir, config_path, ports, anonymous, users):
        stderr_file = open(workdir / "broker.stderr", "wb")
        proc = subprocess.Popen(
            [str(BROKER_BIN), "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=stderr_file,  # a file: a pipe nobody reads would block the broker
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=workdir,
        )
        stderr_file.close()
        expected = sum(1 for p in ports.values() if p)
        lines_q: queue.Queue = queue.Queue()
        stdout_lines: list[str] = []

        def pump():
            for line in proc.stdout:
                stdout_lines.append(line.rstrip("\n"))
                lines_q.put(line)
            lines_q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        listening = 0
        deadline = time.monotonic() + START_TIMEOUT
        while listening < expected:
            try:
                line = lines_q.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=5)
                err = (workdir / "broker.stderr").read_text(errors="replace")
                why = "timed out" if line is not None else f"exited with {proc.returncode}"
                return f"{why}; stdout={stdout_lines!r}\nstderr:\n{err}"
            if line and " listening on " in line:
                listening += 1
        return Broker(
            host=HOST,
            mqtt_port=ports["mqtt"],
            mqtt5_port=ports["mqtt5"],
            ws_port=ports["websocket"],
            username=None if anonymous else USER,
            password=None if anonymous else users[USER] if USER in users else None,
            workdir=workdir,
            config_path=config_path,
            proc=proc,
            stdout_lines=stdout_lines,
        )

    def close(self):
        for b in self._brokers:
            b.stop()


@pytest.fixture
def broker_factory(tmp_path_factory):
    """Call it to start a broker: `broker_factory(limits={...}, anonymous=True)`."""
    factory = BrokerFactory(tmp_path_factory)
    yield factory
    factory.close()


@pytest.fixture
def broker(broker_factory) -> Broker:
    """A default broker: all three listeners, password file with alice/s3cret."""
    return broker_factory()


# --------------------------------------------------------------------------- mosquitto


def mosq_pub(broker: Broker, topic: str, *args: str, port: int | None = None,
             auth: bool = True, timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
    """Runs mosquitto_pub to completion. `args` e.g. ("-m", "hi", "-q", "1", "-r")."""
    cmd = ["mosquitto_pub", "-h", broker.host, "-p", str(port or broker.mqtt_port),
           "-k", "10", "-t", topic, *(broker.auth_args() if auth else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@dataclass
class SubMessage:
    retain: bool
    qos: int
    topic: str
    payload: str


SUB_FORMAT = "MSG|%r|%q|%t|%p"


def _parse_sub_line(line: str) -> SubMessage | None:
    if not line.startswith("MSG|"):
        return None
    _, r, q, t, p = line.rstrip("\n").split("|", 4)
    return SubMessage(retain=r == "1", qos=int(q), topic=t, payload=p)


class MosqSub:
    """A background mosquitto_sub; `start()` returns once its SUBACK arrived."""

    def __init__(self, broker: Broker, topic: str, *args: str, qos: int = 0,
                 port: int | None = None, auth: bool = True):
        self.cmd = ["stdbuf", "-oL", "mosquitto_sub", "-h", broker.host, "-p", str(port or broker.mqtt_port),
                    "-k", "10", "-t", topic, "-q", str(qos), "-d", "-F", SUB_FORMAT,
                    *(broker.auth_args() if auth else []), *args]
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []

    def start(self, timeout: float = MSG_TIMEOUT) -> "MosqSub":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)

        def pump():
            for line in self.proc.stdout:
                self.output.append(line.rstrip("\n"))
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise AssertionError(f"mosquitto_sub did not subscribe: {self.output!r}")
            if line.startswith("Subscribed (mid"):
                return self

    def messages(self, count: int, timeout: float = MSG_TIMEOUT) -> list[SubMessage]:
        """Waits for `count` messages (returns fewer on timeout or exit)."""
        got: list[SubMessage] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            m = _parse_sub_line(line)
            if m:
                got.append(m)
        return got

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def mosq_sub_once(broker: Broker, topic: str, *args: str, wait_secs: int = 2, qos: int = 0,
                  timeout: float = TOOL_TIMEOUT) -> tuple[subprocess.CompletedProcess, list[SubMessage]]:
    """mosquitto_sub -C 1 -W wait_secs: at most one message, exit after wait_secs without."""
    cmd = ["mosquitto_sub", "-h", broker.host, "-p", str(broker.mqtt_port), "-k", "10",
           "-t", topic, "-q", str(qos), "-C", "1", "-W", str(wait_secs), "-F", SUB_FORMAT,
           *broker.auth_args(), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    msgs = [m for m in map(_parse_sub_line, res.stdout.splitlines()) if m]
    return res, msgs


@pytest.fixture
def mosq_subs():
    """Background mosquitto_sub runs, stopped at teardown: `mosq_subs(broker, topic, ...)`."""
    started: list[MosqSub] = []

    def make(*a, **kw) -> MosqSub:
        s = MosqSub(*a, **kw)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.stop()


# --------------------------------------------------------------------------- paho


class PahoClient:
    """A paho client on its own network thread with blocking helpers."""

    def __init__(self, broker: Broker, *, client_id: str | None = None, protocol=mqtt.MQTTv311,
                 transport: str = "tcp", port: int | None = None, username: str | None = "default",
                 password: str | None = "default", clean_session: bool | None = True,
                 will: dict | None = None, ws_path: str | None = None):
        self.broker = broker
        self.client_id = client_id or unique("paho")
        self.protocol = protocol
        if port is None:
            port = {"websockets": broker.ws_port}.get(transport) or (
                broker.mqtt5_port if protocol == mqtt.MQTTv5 else broker.mqtt_port)
        self.port = port
        kwargs = {}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean_session
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=protocol, transport=transport, **kwargs)
        # Refused logins are retried by paho's loop otherwise; one try is what we test.
        self.client.reconnect_delay_set(min_delay=30, max_delay=30)
        if username == "default":
            username, password = broker.username, broker.password
        if username is not None:
            self.client.username_pw_set(username, password)
        if will:
            self.client.will_set(**will)
        if ws_path is not None:
            self.client.ws_set_options(path=ws_path)
        self.messages: queue.Queue = queue.Queue()
        self.connack: queue.Queue = queue.Queue()
        self.subacks: dict[int, threading.Event] = {}
        self.granted: dict[int, list] = {}
        self.disconnected = threading.Event()
        self.connected_ok = threading.Event()
        self.settled = threading.Event()  # CONNACK received or connection lost
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        c.on_subscribe = self._on_subscribe
        self._lock = threading.Lock()

    def _on_connect(self, _c, _u, flags, reason_code, _props):
        if not reason_code.is_failure:
            self.connected_ok.set()
        self.connack.put((flags, reason_code))
        self.settled.set()

    def _on_disconnect(self, _c, _u, _flags, reason_code, _props):
        self.disconnected.set()
        self.settled.set()

    def _on_subscribe(self, _c, _u, mid, reason_codes, _props):
        with self._lock:
            self.granted[mid] = reason_codes
            ev = self.subacks.setdefault(mid, threading.Event())
        ev.set()

    def connect(self, timeout: float = MSG_TIMEOUT, expect_ok: bool = True, clean_start=None):
        """Connects; returns the CONNACK flags. With expect_ok=False returns whether it
        connected successfully within `timeout` (no exception on refusal)."""
        kw = {"keepalive": 10}
        if self.protocol == mqtt.MQTTv5 and clean_start is not None:
            kw["clean_start"] = clean_start
        try:
            self.client.connect(self.broker.host, self.port, **kw)
        except OSError as e:
            if expect_ok:
                raise
            # No TCP connection at all is a dead listener, not a refused login.
            raise AssertionError(f"paho {self.client_id}: cannot reach port {self.port} ({e}): "
                                 "the listener is down, which is not a login refusal") from None
        self.client.loop_start()
        if not expect_ok:
            # A refusal is a socket close (rumqttd sends no CONNACK): stop waiting at it.
            # Neither accepted nor closed in time is a hang, not a refusal.
            assert self.settled.wait(timeout), (
                f"paho {self.client_id}: neither accepted nor refused within {timeout}s")
            return self.connected_ok.is_set()
        try:
            flags, rc = self.connack.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"paho {self.client_id}: no CONNACK within {timeout}s "
                                 f"(port {self.port})") from None
        assert not rc.is_failure, f"connect refused: {rc}"
        return flags

    def subscribe(self, topic: str, qos: int = 0, timeout: float = MSG_TIMEOUT, **kw):
        """Subscribes and waits for the SUBACK; returns the granted reason codes."""
        with self._lock:
            if self.protocol == mqtt.MQTTv5 and kw:
                from paho.mqtt.subscribeoptions import SubscribeOptions
                res, mid = self.client.subscribe(topic, options=SubscribeOptions(qos=qos, **kw))
            else:
                res, mid = self.client.subscribe(topic, qos)
            assert res == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(res)
            ev = self.subacks.setdefault(mid, threading.Event())
        assert ev.wait(timeout), f"no SUBACK for {topic}"
        granted = self.granted[mid]
        assert all(not rc.is_failure for rc in granted), f"subscription refused: {granted}"
        return granted

    def publish(self, topic: str, payload, qos: int = 0, retain: bool = False,
                properties=None, timeout: float = MSG_TIMEOUT):
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"publish to {topic} not completed (qos {qos})"
        return info

    def get(self, timeout: float = MSG_TIMEOUT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"paho {self.client_id}: no message within {timeout}s") from None

    def get_n(self, n: int, timeout: float = MSG_TIMEOUT) -> list:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                out.append(self.messages.get(timeout=remaining))
            except queue.Empty:
                break
        return out

    def expect_nothing(self, window: float = QUIET_WINDOW):
        try:
            msg = self.messages.get(timeout=window)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {msg.topic}: {msg.payload!r}")

    def disconnect(self):
        try:
            self.client.disconnect()
        finally:
            self.disconnected.wait(5)
            self.client.loop_stop()

    def close(self):
        """Teardown: stop the thread whatever the state."""
        try:
            self.client.disconnect()
        except Exception:
            pass
        self.client.loop_stop()


@pytest.fixture
def paho():
    """Factory of paho clients (not yet connected), all closed at teardown."""
    made: list[PahoClient] = []

    def make(broker: Broker, **kw) -> PahoClient:
        c = PahoClient(broker, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
