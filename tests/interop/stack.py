"""The whole stack for the dashboard and contract tests: InfluxDB 1.6 (Debian), `dcs up
--simulate` with the shipped deploy/ configs (ports moved to free ones), Node-RED with the
shipped panel, and an MQTT observer that records every message the services publish.

Every process gets its own temp dir and free ports, so these tests run beside the others.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from conftest import BIN_DIR, HOST, REPO_ROOT, free_port

DEPLOY = REPO_ROOT / "deploy"
NODE_RED_DIR = DEPLOY / "node-red"
NODE_RED_BIN = NODE_RED_DIR / "node_modules" / ".bin" / "node-red"
START_TIMEOUT = 90.0  # the whole stack on a busy 2-core machine


def wait_until(what: str, check, timeout: float, interval: float = 0.2, log=None):
    """Polls `check` until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            extra = f"\n--- log ---\n{log()}" if log else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


class Proc:
    """A child process whose output goes to a file (read back in failure messages)."""

    def __init__(self, name: str, args: list, cwd: Path, env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.p = subprocess.Popen(
            [str(a) for a in args], cwd=cwd, env=env, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def text(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, timeout: float = 15) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self._log.close()


class Influx:
    """Debian's influxd 1.6 on free ports, database `dcs`."""

    def __init__(self, root: Path):
        self.port = free_port()
        d = root / "influx"
        d.mkdir()
        conf = d / "influxdb.conf"
        conf.write_text(
            f'bind-address = "{HOST}:{free_port()}"\n'
            f'[meta]\n  dir = "{d}/meta"\n'
            f'[data]\n  dir = "{d}/data"\n  wal-dir = "{d}/wal"\n'
            f'[http]\n  bind-address = "{HOST}:{self.port}"\n  log-enabled = false\n'
            "[monitor]\n  store-enabled = false\n"
            "[reporting]\n  disabled = true\n"
        )
        self.proc = Proc("influxd", ["influxd", "run", "-config", conf], d, dict(os.environ), root)
        self.url = f"http://{HOST}:{self.port}"
        wait_until("influxd /ping", self._ping, 30, log=self.proc.text)
        self.query("CREATE DATABASE dcs", db=None)

    def _ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as r:
                return r.status == 204
        except OSError:
            return False

    def query(self, q: str, db: str | None = "dcs") -> list[dict]:
        """The series of an InfluxQL answer (POST, so statements that write work too)."""
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        body = urllib.parse.urlencode(params).encode()
        with urllib.request.urlopen(f"{self.url}/query", data=body, timeout=10) as r:
            answer = json.load(r)
        for res in answer.get("results", []):
            if "error" in res:
                raise AssertionError(f"InfluxQL `{q}` failed: {res['error']}")
        return [s for res in answer.get("results", []) for s in res.get("series", [])]

    def stop(self) -> None:
        self.proc.stop()


@dataclass
class Captured:
    topic: str
    payload: bytes
    retain: bool
    at: float


@dataclass
class Observer:
    """An MQTT client subscribed to `#` that keeps every message and the latest per topic."""

    port: int
    username: str
    password: str
    messages: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{free_port()}")
        self.c.username_pw_set(self.username, self.password)
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        self.c.connect(HOST, self.port, keepalive=30)
        self.c.loop_start()

    def _on_message(self, _c, _u, m):
        with self._lock:
            self.messages.append(Captured(m.topic, bytes(m.payload), bool(m.retain), time.monotonic()))

    def snapshot(self) -> list[Captured]:
        with self._lock:
            return list(self.messages)

    def latest_json(self, topic: str):
        for m in reversed(self.snapshot()):
            if m.topic == topic:
                try:
                    return json.loads(m.payload)
                except ValueError:
                    return None
        return None

    def wait_json(self, topic: str, pred, timeout: float, since: float = 0.0, log=None):
        """The first JSON payload on `topic` received after `since` for which `pred` holds."""

        def check():
            for m in self.snapshot():
                if m.topic == topic and m.at >= since:
                    try:
                        v = json.loads(m.payload)
                    except ValueError:
                        continue
                    if pred(v):
                        return v
            return None

        return wait_until(f"a matching message on {topic}", check, timeout, log=log)

    def publish(self, topic: str, payload: str) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def stop(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class Stack:
    """`dcs up --simulate` with InfluxDB, from the shipped configs."""

    def __init__(self, root: Path):
        self.root = root
        self.influx = Influx(root)
        cfg = root / "config"
        cfg.mkdir()
        self.mqtt_port = free_port()
        sim_port, ctl_port, ca_port, beacon_port, ph2_port = (free_port() for _ in range(5))
        self.marta_port, self.marta_control = free_port(), free_port()

        def copy(name: str, *replacements: tuple[str, str]) -> None:
            text = (DEPLOY / name).read_text()
            for old, new in replacements:
                assert old in text, f"deploy/{name} no longer contains `{old}`"
                text = text.replace(old, new)
            (cfg / name).write_text(text)

        copy("julabo-sim.yaml", ("127.0.0.1:5050", f"{HOST}:{sim_port}"),
             ("127.0.0.1:5051", f"{HOST}:{ctl_port}"))
        copy("julabo.yaml", ("poll_interval_secs: 5", "poll_interval_secs: 1"))
        copy("caen.yaml", ("port: 15064", f"port: {ca_port}"))
        copy("ph2acf.yaml", ("127.0.0.1:5000", f"{HOST}:{ph2_port}"))
        copy("ph2acf-sim.yaml", ("127.0.0.1:5000", f"{HOST}:{ph2_port}"), ("run_secs: 20", "run_secs: 3"))
        copy("marta-sim.yaml", ("127.0.0.1:5502", f"{HOST}:{self.marta_port}"),
             ("127.0.0.1:5503", f"{HOST}:{self.marta_control}"))
        copy("marta.yaml")
        copy("marta-registers.yaml")
        for name in ["telemetry.yaml", "interlock.yaml", "notifier.yaml", "env-sim.yaml", "burnin.yaml"]:
            copy(name)
        (cfg / "burnin").mkdir()
        for seq in (DEPLOY / "burnin").glob("*.yaml"):
            shutil.copy(seq, cfg / "burnin" / seq.name)
        (cfg / "ph2acf").mkdir()
        shutil.copy(DEPLOY / "ph2acf/PS_module.xml", cfg / "ph2acf/PS_module.xml")
        stack = (
            "state_dir: state\n"
            f"mqtt: {{url: mqtt://{HOST}:{self.mqtt_port}, username: operator, password_file: state/secret}}\n"
            f"broker:\n  listeners: {{mqtt: {HOST}:{self.mqtt_port}, mqtt5: null, websocket: null}}\n"
            "  auth: {password_file: state/passwd}\n  meters_interval_secs: 0\n"
        )
        services = (DEPLOY / "dcs.yaml").read_text().split("\nservices:", 1)[1]
        (cfg / "dcs.yaml").write_text(stack + "services:" + services)
        env = dict(os.environ)
        env.update({
            "JULABO_PORT": f"tcp://{HOST}:{sim_port}",
            "MARTA_PORT": str(self.marta_port),
            "CAEN_CA_ADDR_LIST": f"{HOST}:{ca_port}",
            "EPICS_CAS_BEACON_PORT": str(beacon_port),
            "EPICS_CA_REPEATER_PORT": str(beacon_port),
            "DCS_STATE_DIR": str(cfg / "state"),
            "DCS_INFLUX_URL": self.influx.url,
            "DCS_INFLUX_DATABASE": "dcs",
        })
        for k in ["DCS_MQTT_URL", "DCS_MQTT_USERNAME", "DCS_MQTT_PASSWORD", "DCS_MONGODB_URI"]:
            env.pop(k, None)
        self.up = Proc("dcs-up", [BIN_DIR / "dcs", "up", "--simulate", "--config", cfg / "dcs.yaml"],
                       cfg, env, root)
        wait_until("`dcs: up;` from the launcher", lambda: "dcs: up;" in self.up.text(100000),
                   START_TIMEOUT, log=self.up.text)
        self.username = "operator"
        self.password = (cfg / "state/secret").read_text().strip()
        self.observer = Observer(self.mqtt_port, self.username, self.password)

    def log(self) -> str:
        return self.up.text()

    def stop(self) -> None:
        self.observer.stop()
        self.up.stop(timeout=30)
        self.influx.stop()


class NodeRed:
    """Node-RED from deploy/node-red (npm), with the shipped flows and settings."""

    def __init__(self, root: Path, stack: Stack):
        assert NODE_RED_BIN.exists(), "Node-RED is not installed: run `npm ci --prefix deploy/node-red`"
        user_dir = root / "node-red"
        user_dir.mkdir()
        for f in ["flows.json", "flows_cred.json", "settings.js"]:
            shutil.copy(NODE_RED_DIR / f, user_dir / f)
        (user_dir / "node_modules").symlink_to(NODE_RED_DIR / "node_modules")
        self.port = free_port()
        env = dict(os.environ)
        env.update({
            "DCS_MQTT_HOST": HOST,
            "DCS_MQTT_PORT": str(stack.mqtt_port),
            "DCS_MQTT_USERNAME": stack.username,
            "DCS_MQTT_PASSWORD": stack.password,
            "NODE_RED_HOST": HOST,
            "NODE_RED_PORT": str(self.port),
        })
        self.proc = Proc("node-red", [NODE_RED_BIN, "--settings", user_dir / "settings.js",
                                      "--userDir", user_dir], user_dir, env, root)
        wait_until("Node-RED connected to the broker",
                   lambda: "Connected to broker" in self.proc.text(100000), START_TIMEOUT,
                   log=self.proc.text)
        self.url = f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        self.proc.stop()
