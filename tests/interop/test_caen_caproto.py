"""CAEN over EPICS Channel Access against caproto, an independent CA implementation.

1. `caen-sim` (our Rust CA server) probed by caproto's threading client (and its
   `caproto-put` command-line tool): native types, DBR_CTRL_ENUM strings, put with
   notify, monitors through a ramp, a refused write, fault injection and ClearAlarm.
2. `caen-fsm` (our Rust CA client) driving `caen_ioc.py`, a small caproto IOC serving
   the same PV names, commanded over MQTT through `dcs-broker`.

Every test owns its processes and its ports (CA search/TCP, beacon/repeater, MQTT) and
stops its processes at teardown. SPEC 3.1, 3.4, 4.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from caproto import ChannelType

from conftest import BIN_DIR, HOST, PASSWORD, USER, free_port

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
IOC_SCRIPT = HERE / "caen_ioc.py"
SIM_BIN = BIN_DIR / "caen-sim"
FSM_BIN = BIN_DIR / "caen-fsm"

START_TIMEOUT = 15.0  # a process printing its ready line
WAIT = 10.0  # something that should happen
CA_TIMEOUT = 5.0  # one CA operation

# Test channel (SPEC 4.1 ranges): LV board 0 chan 0, HV board 12 chan 0.
PREFIX = "t"
LV = f"{PREFIX}:00:000"
HV = f"{PREFIX}:12:000"
LV_PVS = ["V0Set", "I0Set", "Pw", "Trip", "TripInt", "TripExt", "Status", "VMon", "IMon",
          "UNVThr", "OVVThr", "RUpTime", "RDwTime", "Temp"]
HV_PVS = ["V0Set", "I0Set", "Pw", "Trip", "TripInt", "TripExt", "Status", "VMon", "IMon",
          "RUp", "RDWn", "PDwn", "ImRange"]
INTERNAL_TRIP = 1 << 9


# --------------------------------------------------------------------------- plumbing


class CaPorts:
    """CA ports private to one test: search/TCP and beacon/repeater (cf. tests/src/caen.rs)."""

    def __init__(self):
        self.server = free_port()
        self.beacon = free_port()
        while self.beacon == self.server:
            self.beacon = free_port()

    def env(self) -> dict[str, str]:
        return {
            "EPICS_CA_ADDR_LIST": HOST,
            "EPICS_CA_AUTO_ADDR_LIST": "NO",
            "EPICS_CA_SERVER_PORT": str(self.server),
            "EPICS_CA_REPEATER_PORT": str(self.beacon),
            "EPICS_CAS_INTF_ADDR_LIST": HOST,
            "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
            "EPICS_CAS_BEACON_ADDR_LIST": HOST,
            "EPICS_CAS_BEACON_PORT": str(self.beacon),
        }

    def process_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("EPICS_") and not k.startswith("CAPROTO_")}
        env.update(self.env())
        env["PYTHONUNBUFFERED"] = "1"
        return env


class Proc:
    """A child process: stdout pumped into a list (and searched for lines), stderr in a
    file (a pipe nobody reads would block the child)."""

    def __init__(self, name: str, argv: list[str], env: dict, workdir: Path):
        self.name = name
        self.argv = argv
        self.stderr_path = workdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL, env=env, cwd=workdir,
                                         text=True, start_new_session=True)
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._eof = False
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout(self) -> str:
        with self._cv:
            return "\n".join(self.lines)

    def describe(self, tail: int = 60) -> str:
        err = self.stderr().splitlines()
        rc = self.proc.poll()
        return (f"--- {self.name} ({'running' if rc is None else f'exited {rc}'}) "
                f"stdout:\n{self.stdout()}\n--- {self.name} stderr (last {tail} lines):\n"
                + "\n".join(err[-tail:]))

    def wait_stdout(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cv:
            while True:
                for line in self.lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._cv.wait(min(left, 0.2))
        self.stop()
        raise AssertionError(f"{self.name}: no stdout line matching {pattern!r} within "
                             f"{timeout}s\n{self.describe()}")

    def wait_stderr(self, text: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.name}: never logged {text!r} within {timeout}s\n"
                                     f"{self.describe()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL; returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            return None


@pytest.fixture
def procs(tmp_path):
    """`procs(name, argv, ports)` starts a child; every child is stopped at teardown."""
    started: list[Proc] = []

    def start(name: str, argv: list[str], ports: CaPorts) -> Proc:
        env = ports.process_env()
        # caen-sim's PV writes are logged at debug (quiet in a healthy stack); the
        # tests read them back.
        env["DCS_LOG"] = "info,caen_sim::server=debug"
        p = Proc(name, argv, env, tmp_path)
        started.append(p)
        return p

    yield start
    for p in reversed(started):
        p.stop()


@pytest.fixture
def ca_ports():
    return CaPorts()


@pytest.fixture
def ca(ca_ports, monkeypatch):
    """caproto's threading client, searching only this test's server, no repeater.

    caproto reads the EPICS environment when the context is built (server port) and at
    each search (address list): set it for this test before creating the context."""
    for k, v in ca_ports.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", f"{HOST}:{ca_ports.server}")
    monkeypatch.delenv("EPICS_CA_NAME_SERVERS", raising=False)
    from caproto.threading.client import Context, SharedBroadcaster

    broadcaster = SharedBroadcaster()
    ctx = Context(broadcaster, timeout=CA_TIMEOUT)
    client = CaClient(ctx)
    yield client
    client.close()
    # caproto 1.3: Context.disconnect() drops its circuits and then, as the broadcaster's
    # last listener, calls SharedBroadcaster.disconnect(), which closes the UDP socket
    # before stopping the search-retry thread; a search batch in flight then dies on EBADF
    # (seen ~1 run in 10 as PytestUnhandledThreadExceptionWarning "Exception in thread
    # retry"). Stop that thread first (private attributes, hence the getattr guards).
    for ev, how in (("_searching_enabled", "clear"), ("_close_event", "set"), ("_search_now", "set")):
        if (e := getattr(broadcaster, ev, None)) is not None:
            getattr(e, how)()
    retry = getattr(broadcaster, "_retry_unanswered_searches_thread", None)
    if retry is not None:
        retry.join(timeout=3)
    ctx.disconnect()
    if getattr(broadcaster, "udp_sock", None) is not None:
        broadcaster.disconnect()


class CaClient:
    """Blocking helpers over a caproto threading context."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._pvs: dict = {}
        # caproto keeps subscription callbacks by WEAK reference: a lambda passed to
        # add_callback is collected at once and never called. Keep them here.
        self._callbacks: list = []
        self._subs: list = []

    def pv(self, name: str):
        if name not in self._pvs:
            (pv,) = self.ctx.get_pvs(name, timeout=CA_TIMEOUT)
            pv.wait_for_connection(timeout=CA_TIMEOUT)
            self._pvs[name] = pv
        return self._pvs[name]

    def read(self, name: str, data_type=None):
        return self.pv(name).read(timeout=CA_TIMEOUT, data_type=data_type)

    def value(self, name: str):
        return self.read(name).data[0]

    def label(self, name: str) -> str:
        """An enum PV as its string (DBR_STRING)."""
        return self.read(name, ChannelType.STRING).data[0].decode()

    def native_type(self, name: str) -> ChannelType:
        return self.pv(name).channel.native_data_type

    def put(self, name: str, value, as_string: bool = False):
        """Write with notify (WRITE_NOTIFY); returns the server's response."""
        kw = {"data_type": ChannelType.STRING} if as_string else {}
        return self.pv(name).write([value], wait=True, timeout=CA_TIMEOUT, **kw)

    def monitor(self, name: str) -> "Monitor":
        mon = Monitor(name)
        sub = self.pv(name).subscribe()
        sub.add_callback(mon.on_update)
        self._callbacks.append(mon.on_update)
        self._subs.append(sub)
        return mon

    def poll(self, name: str, pred, what: str, timeout: float = WAIT, explain=lambda: ""):
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(name)
            if pred(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} never {what} within {timeout}s (last {v!r})"
                                     f"\n{explain()}")
            time.sleep(0.05)

    def close(self):
        for sub in self._subs:
            try:
                sub.clear()
            except Exception:
                pass


class Monitor:
    """Values of one PV as its monitor delivers them."""

    def __init__(self, name: str):
        self.name = name
        self.values: list = []
        self._cv = threading.Condition()

    def on_update(self, _sub, response):
        with self._cv:
            self.values.append(response.data[0])
            self._cv.notify_all()

    def mark(self) -> int:
        """`wait(since=mark())` only looks at updates arriving after this call."""
        with self._cv:
            return len(self.values)

    def wait(self, pred, what: str, *, since: int = 0, timeout: float = WAIT):
        """Waits for an update (from index `since` on) satisfying `pred`; returns its
        index in `values`."""
        deadline = time.monotonic() + timeout
        seen = since
        with self._cv:
            while True:
                for i in range(seen, len(self.values)):
                    if pred(self.values[i]):
                        return i
                seen = len(self.values)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"monitor of {self.name}: never {what} within "
                                         f"{timeout}s; updates: {self.values!r} (looking "
                                         f"from index {since})")
                self._cv.wait(left)

    def snapshot(self) -> list:
        with self._cv:
            return list(self.values)


def check_put(resp, what: str):
    assert resp.status.success, f"{what}: refused with {resp.status.name} ({resp.status.description})"


def caproto_put_cli(ports: CaPorts, pv: str, value: str) -> subprocess.CompletedProcess:
    """`caproto-put --no-repeater -c PV VALUE` (write with notify), on this test's ports."""
    res = subprocess.run([str(VENV_BIN / "caproto-put"), "--no-repeater", "-c", "--timeout",
                          str(CA_TIMEOUT), pv, value],
                         capture_output=True, text=True, timeout=30, env=ports.process_env())
    assert res.returncode == 0, f"caproto-put {pv} {value}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def write_config(path: Path, *, mqtt_port: int = 1, ca_port: int, module: str | None = "module_0") -> Path:
    """The CAEN YAML (SPEC 4.3) for one channel, shared by caen-sim and caen-fsm; same
    shape as `config()` in tests/src/caen.rs, fast ramps."""
    mod = f", module: {module}" if module else ""
    path.write_text(
        f"name: dcs\n"
        f"prefix: {PREFIX}\n"
        f"mqtt:\n  url: mqtt://{HOST}:{mqtt_port}\n  username: {USER}\n  password: {PASSWORD}\n"
        f"  keep_alive_secs: 5\n"
        f"ca:\n  addr_list: {HOST}:{ca_port}\n  put_timeout_secs: 2\n  connect_timeout_secs: 3\n"
        f"safety:\n  hv_safe_voltage: 5.0\n  hv_off_timeout_secs: 20\n"
        f"timing:\n  refresh_secs: 30\n"
        f"sim:\n  port: {ca_port}\n  tick_ms: 20\n  state_file: {path.parent / 'sim-state.json'}\n"
        f"global:\n"
        f"  lv: {{setV: 12.0, maxI: 5.0, tripTime: 1.0, rampUpTime: 0.0, rampDwnTime: 0.0,"
        f" tripExt: \"0b00010001\", limitV: 15}}\n"
        f"  hv: {{setV: 60.0, maxI: 500.0, rampUpSpeed: 100.0, rampDwnSpeed: 50.0, tripTime: 0.5,"
        f" tripMode: Ramp, imRange: Low, limitV: 300}}\n"
        f"channels:\n"
        f"  \"0\": {{lv: {{board: 0, chan: 0}}, hv: {{board: 12, chan: 0}}{mod}}}\n"
    )
    return path


# ------------------------------------------------------- 1. caen-sim probed by caproto


def test_sim_probed_by_caproto_client(tmp_path, procs, ca_ports, ca):
    assert SIM_BIN.exists(), f"{SIM_BIN} not built (set DCS_BIN_DIR)"
    cfg = write_config(tmp_path / "caen.yaml", ca_port=ca_ports.server)
    sim = procs("caen-sim", [str(SIM_BIN), "--config", str(cfg)], ca_ports)
    m = sim.wait_stdout(r"caen-sim: serving (\d+) channels \((\d+) PVs\) on CA port (\d+)")
    assert (m[1], m[3]) == ("2", str(ca_ports.server)), m[0]

    # --- get: values and native types
    for base, names in ((LV, LV_PVS), (HV, HV_PVS)):
        for n in names:
            pv = f"{base}:{n}"
            want = {"Status": ChannelType.LONG, "Pw": ChannelType.ENUM,
                    "PDwn": ChannelType.ENUM, "ImRange": ChannelType.ENUM}.get(n, ChannelType.DOUBLE)
            assert ca.native_type(pv) == want, f"{pv}: native type {ca.native_type(pv)!r}, want {want!r}"
    assert ca.value(f"{HV}:VMon") == 0.0
    assert ca.value(f"{HV}:Status") == 0
    assert ca.value(f"{HV}:V0Set") == 0.0
    assert ca.value(f"{LV}:Temp") == 25.0
    enums = {f"{HV}:Pw": (b"Off", b"On"), f"{LV}:Pw": (b"Off", b"On"),
             f"{HV}:PDwn": (b"Kill", b"Ramp"), f"{HV}:ImRange": (b"Low", b"High"),
             f"{PREFIX}:ClearAlarm": (b"No", b"Yes")}
    for pv, strings in enums.items():
        r = ca.read(pv, ChannelType.CTRL_ENUM)
        assert tuple(r.metadata.enum_strings) == strings, f"{pv}: DBR_CTRL_ENUM strings {r.metadata!r}"
        assert r.data[0] == 0, f"{pv}: {r.data!r}"
    assert ca.label(f"{HV}:Pw") == "Off"

    # --- monitors, subscribed before anything moves
    status = ca.monitor(f"{HV}:Status")
    vmon = ca.monitor(f"{HV}:VMon")
    status.wait(lambda v: v == 0, "reports its initial 0")
    vmon.wait(lambda v: v == 0.0, "reports its initial 0")

    # --- put with notify, then Pw by its string
    st_mark, vm_mark = status.mark(), vmon.mark()
    check_put(ca.put(f"{HV}:V0Set", 20.0), "V0Set 20")
    check_put(ca.put(f"{HV}:RUp", 100.0), "RUp 100")
    check_put(ca.put(f"{HV}:Pw", "On", as_string=True), "Pw 'On' (DBR_STRING)")
    assert ca.value(f"{HV}:V0Set") == 20.0
    assert ca.value(f"{HV}:RUp") == 100.0
    assert ca.label(f"{HV}:Pw") == "On"

    # --- the ramp through the monitors: Status 3 (on + ramping up), then 1; VMon to 20
    i_ramp = status.wait(lambda v: v == 3, "3 (on, ramping up)", since=st_mark)
    status.wait(lambda v: v == 1, "1 (on, steady) after 3", since=i_ramp + 1)
    assert 1 not in status.snapshot()[st_mark:i_ramp], f"Status 1 before 3: {status.snapshot()}"
    i_top = vmon.wait(lambda v: math.isclose(v, 20.0, abs_tol=1e-6), "20 V", since=vm_mark)
    ramp = vmon.snapshot()[vm_mark:i_top + 1]
    assert any(0.0 < v < 20.0 for v in ramp), f"no intermediate VMon during the ramp: {ramp}"
    assert ramp == sorted(ramp), f"VMon not monotonic while ramping up: {ramp}"

    # --- a refused write: negative set-point, value unchanged
    resp = ca.put(f"{HV}:V0Set", -5.0)
    assert not resp.status.success, f"V0Set -5 accepted: {resp!r}"
    assert ca.value(f"{HV}:V0Set") == 20.0, "a refused write changed V0Set"
    assert ca.value(f"{HV}:Status") == 1

    # --- fault injection: SimTrip -> internal trip latched, Pw Off
    st_mark, vm_mark = status.mark(), vmon.mark()
    check_put(ca.put(f"{HV}:SimTrip", 1), "SimTrip 1")
    status.wait(lambda v: v & INTERNAL_TRIP, "with bit 9 (internal trip)", since=st_mark)
    assert ca.value(f"{HV}:Pw") == 0 and ca.label(f"{HV}:Pw") == "Off", "a trip leaves Pw On"
    vmon.wait(lambda v: v == 0.0, "0 V after a trip with PDwn Kill", since=vm_mark)
    assert ca.value(f"{HV}:Status") & INTERNAL_TRIP, "trip not latched"
    assert ca.value(f"{HV}:SimTrip") == 0, "SimTrip reads back 0"

    # --- ClearAlarm "Yes" (caproto-put command-line tool, write with notify)
    st_mark = status.mark()
    out = caproto_put_cli(ca_ports, f"{PREFIX}:ClearAlarm", "Yes")
    status.wait(lambda v: not v & INTERNAL_TRIP, "without bit 9 after ClearAlarm", since=st_mark)
    assert ca.value(f"{HV}:Status") == 0, ca.value(f"{HV}:Status")
    assert ca.label(f"{PREFIX}:ClearAlarm") == "No", f"ClearAlarm reads back No; caproto-put said:\n{out.stdout}"
    assert "write" in sim.stderr() and "ClearAlarm" in sim.stderr(), "writes are logged"
    assert sim.stop() == 0, f"caen-sim did not exit cleanly on SIGTERM\n{sim.describe()}"


# ------------------------------------------------ 2. caen-fsm against a caproto IOC


class Inbox:
    """Every MQTT message a paho client received, searchable while more arrive."""

    def __init__(self, client):
        self.client = client
        self.seen: list = []

    def mark(self) -> int:
        """Drains what has arrived; `wait(since=mark)` then only looks at later messages."""
        while True:
            try:
                self.seen.append(self.client.messages.get_nowait())
            except queue.Empty:
                return len(self.seen)

    def wait(self, topic: str, pred, what: str, *, since: int = 0, timeout: float = WAIT,
             explain=lambda: ""):
        i = since
        deadline = time.monotonic() + timeout
        while True:
            while i < len(self.seen):
                m = self.seen[i]
                i += 1
                if m.topic == topic and pred(m.payload):
                    return m
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise queue.Empty
                self.seen.append(self.client.messages.get(timeout=left))
            except queue.Empty:
                got = [x.payload[:300] for x in self.seen[since:] if x.topic == topic]
                raise AssertionError(f"{topic}: never {what} within {timeout}s; got {got}\n"
                                     f"{explain()}") from None


def _json(payload: bytes):
    try:
        return json.loads(payload)
    except ValueError:
        return None


def test_fsm_drives_caproto_ioc(tmp_path, procs, ca_ports, ca, broker, paho):
    assert FSM_BIN.exists(), f"{FSM_BIN} not built (set DCS_BIN_DIR)"
    ioc = procs("caen-ioc", [sys.executable, str(IOC_SCRIPT), "--prefix", PREFIX,
                             "--lv", "0:0", "--hv", "12:0"], ca_ports)
    m = ioc.wait_stdout(r"caen-ioc: serving (\d+) PVs on CA port (\d+) tcp (\d+)")
    assert m[2] == str(ca_ports.server), m[0]

    obs = paho(broker)
    obs.connect()
    obs.subscribe("dcs/#", qos=1)
    inbox = Inbox(obs)

    cfg = write_config(tmp_path / "caen.yaml", mqtt_port=broker.mqtt_port, ca_port=ca_ports.server)
    fsm = procs("caen-fsm", [str(FSM_BIN), "--config", str(cfg)], ca_ports)
    fsm.wait_stderr("watching PVs")

    def explain() -> str:
        return f"{fsm.describe(120)}\n{ioc.describe(40)}"

    def state_is(state):
        return lambda p: (_json(p) or {}).get("fsm_state") == state

    def command(topic: str, payload: str, timeout: float = WAIT + 10) -> int:
        """Sends a command, checks its reply; returns the inbox mark taken before sending."""
        mark = inbox.mark()
        obs.publish(topic, payload, qos=1)
        m = inbox.wait("dcs/reply", lambda p: (_json(p) or {}).get("topic") == topic,
                       f"a reply to {topic}", since=mark, timeout=timeout, explain=explain)
        reply = json.loads(m.payload)
        assert reply.get("ok") is True, f"{topic} {payload!r}: {reply}\n{explain()}"
        return mark

    def wait_state(state: str, since: int = 0):
        inbox.wait("dcs/status", state_is(state), f"fsm_state {state}", since=since,
                   explain=explain)

    def ioc_writes() -> list[tuple[str, str]]:
        return [tuple(line.split()[2:4]) for line in ioc.stdout().splitlines()
                if line.startswith("caen-ioc: write ")]

    # --- connects to the caproto IOC, writes the configured settings
    wait_state("LV_OFF")
    ca.poll(f"{LV}:V0Set", lambda v: v == 12.0, "12 V (global lv setV)", explain=explain)
    ca.poll(f"{HV}:V0Set", lambda v: v == 60.0, "60 V (global hv setV)", explain=explain)
    ca.poll(f"{HV}:PDwn", lambda v: v == 1, "Ramp (tripMode)", explain=explain)
    assert ca.value(f"{HV}:RUp") == 100.0, explain()
    assert ca.value(f"{LV}:TripExt") == 0b00010001, explain()
    assert ca.label(f"{HV}:ImRange") == "Low", explain()
    assert ca.value(f"{LV}:Pw") == 0 and ca.value(f"{HV}:Pw") == 0, "nothing switched at start"
    ch = inbox.wait("dcs/channels", lambda p: (_json(p) or {}).get("id") == "0",
                    "an object for channel 0", explain=explain)
    ch = json.loads(ch.payload)
    for f in ("lv_status", "hv_status", "lv_setV", "hv_setV", "hv_tripMode", "hv_imRange", "module"):
        assert f in ch, f"{f} missing in {ch}"

    # --- LV on
    mark = command("dcs/cmd/switch/lv", "on")
    wait_state("LV_ON", mark)
    assert ca.value(f"{LV}:Pw") == 1, f"LV Pw not On on the IOC\n{explain()}"
    assert ca.label(f"{LV}:Pw") == "On"
    assert ca.value(f"{LV}:Status") == 1

    # --- HV on
    mark = command("dcs/cmd/switch/hv", "on")
    wait_state("HV_ON", mark)
    assert ca.value(f"{HV}:Pw") == 1, f"HV Pw not On on the IOC\n{explain()}"
    assert ca.value(f"{HV}:VMon") == 60.0

    # --- HV set-point
    mark = command("dcs/cmd/setv/hv/0", "80")
    ca.poll(f"{HV}:V0Set", lambda v: v == 80.0, "80 V", explain=explain)
    inbox.wait("dcs/channels", lambda p: (_json(p) or {}).get("hv_setV") == 80.0,
               "hv_setV 80", since=mark, explain=explain)

    # --- LV off with HV on: HV off first, LV only after
    lv_pw = ca.monitor(f"{LV}:Pw")
    hv_pw = ca.monitor(f"{HV}:Pw")
    lv_pw.wait(lambda v: v == 1, "On (first update)")
    hv_pw.wait(lambda v: v == 1, "On (first update)")
    before = len(ioc_writes())
    mark = command("dcs/cmd/switch/lv", "off")
    wait_state("LV_OFF", mark)
    lv_pw.wait(lambda v: v == 0, "Off", since=1)  # [0] is the current value (On)
    hv_pw.wait(lambda v: v == 0, "Off", since=1)
    assert ca.value(f"{HV}:Pw") == 0 and ca.value(f"{LV}:Pw") == 0, explain()
    pw_writes = [w for w in ioc_writes()[before:] if w[0].endswith(":Pw")]
    assert pw_writes == [(f"{HV}:Pw", "Off"), (f"{LV}:Pw", "Off")], (
        f"expected HV Pw Off then LV Pw Off, the IOC got {pw_writes}\n{explain()}")

    # --- the circuit to the caproto server was never dropped
    assert "repeated VERSION" not in ioc.stdout(), (
        f"caen-fsm re-sent VERSION (caproto would drop the circuit unpatched)\n{explain()}")
    assert fsm.stop() == 0, f"caen-fsm did not exit cleanly on SIGTERM\n{explain()}"
