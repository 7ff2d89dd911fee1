"""marta-sim (our Rust Modbus TCP server, tokio-modbus) probed by pymodbus's client, an
independent Modbus implementation: the registers of the map read as the map says
(float32 big-endian bytes, low word first, decoded here with `struct`), writes to the
control word and set-points take effect in the plant model, everything else is refused
with the exception a PLC gives. SPEC 10.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from pymodbus.client import ModbusTcpClient

from conftest import BIN_DIR, HOST, REPO_ROOT, free_port

SIM_BIN = BIN_DIR / "marta-sim"
MAP = REPO_ROOT / "deploy" / "marta-registers.yaml"
START_TIMEOUT = 15.0


def f32(regs: list[int]) -> float:
    lo, hi = regs
    return struct.unpack(">f", struct.pack(">HH", hi, lo))[0]


def words(v: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", v))
    return [lo, hi]


@pytest.fixture
def sim(tmp_path):
    assert SIM_BIN.exists(), f"{SIM_BIN} not built (set DCS_BIN_DIR)"
    port, control = free_port(), free_port()
    cfg = tmp_path / "marta-sim.yaml"
    cfg.write_text(
        f"tcp: {HOST}:{port}\ncontrol: {HOST}:{control}\nregister_map: {MAP}\n"
        "plant: {chiller_tau_secs: 1, co2_tau_secs: 1}\n"
    )
    proc = subprocess.Popen([str(SIM_BIN), "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + START_TIMEOUT
    for line in proc.stdout:
        if "control on" in line:
            break
        assert time.monotonic() < deadline, "marta-sim not ready"
    client = ModbusTcpClient(HOST, port=port)
    assert client.connect()

    def ctl(line: str) -> str:
        with socket.create_connection((HOST, control)) as s:
            s.sendall(f"{line}\n".encode())
            return s.makefile().readline().strip()

    yield client, ctl
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


def read(client, addr: int, count: int) -> list[int]:
    r = client.read_holding_registers(addr, count=count, slave=1)
    assert not r.isError(), r
    return r.registers


def test_registers_read_as_the_map_says(sim):
    client, ctl = sim
    m = yaml.safe_load(MAP.read_text())
    by_name = {r["name"]: r["register"] for r in m["readings"]}
    # Every reading of the map is served (55 of them), as finite floats.
    for r in m["readings"]:
        v = f32(read(client, r["register"], 2))
        assert v == v and abs(v) < 1e4, (r["name"], v)
    # At rest: ambient temperatures, the default set-points, status 1 (ready), no alarm.
    assert f32(read(client, by_name["TT05_CO2"], 2)) == pytest.approx(20.0)
    assert f32(read(client, by_name["temperature_setpoint"], 2)) == pytest.approx(20.0)
    assert f32(read(client, by_name["speed_setpoint"], 2)) == pytest.approx(3000.0)
    assert read(client, 320, 1) == [1]
    assert read(client, 300, 4) == [0, 0, 0, 0]
    assert read(client, 305, 1) == [0]
    # A register the map does not name is not there (166 is the map's gap), as on a PLC.
    r = client.read_holding_registers(166, count=1, slave=1)
    assert r.isError() and r.exception_code == 2
    r = client.read_holding_registers(164, count=4, slave=1)
    assert r.isError() and r.exception_code == 2


def test_writes_drive_the_plant_and_only_controls_are_writable(sim):
    client, ctl = sim
    assert not client.write_registers(310, words(-25.0), slave=1).isError()
    assert f32(read(client, 310, 2)) == -25.0
    assert f32(read(client, 204, 2)) == -25.0, "temperature_setpoint reading follows"
    assert not client.write_register(305, 0b001, slave=1).isError()  # chiller
    assert not client.write_register(305, 0b011, slave=1).isError()  # + CO2
    deadline = time.monotonic() + 15
    while f32(read(client, 134, 2)) > -24.0:  # TT05_CO2 follows the set-point
        assert time.monotonic() < deadline, f32(read(client, 134, 2))
        time.sleep(0.2)
    assert read(client, 320, 1) == [2]
    assert f32(read(client, 200, 2)) > 2000  # LP_speed towards 3000 rpm
    state = json.loads(ctl("state"))
    assert state["co2_running"] and state["control"] == 3
    # Readings and the status word are not writable: exception 2, nothing changed.
    for addr, value in [(320, 0), (134, 0), (300, 0)]:
        r = client.write_register(addr, value, slave=1)
        assert r.isError() and r.exception_code == 2, (addr, r)
    assert read(client, 320, 1) == [2]
    # Another unit id: a gateway's "target device failed to respond".
    r = client.read_holding_registers(320, count=1, slave=7)
    assert r.isError() and r.exception_code == 0x0B


def test_alarm_bits_and_reset(sim):
    client, ctl = sim
    m = yaml.safe_load(MAP.read_text())
    eb = next(a for a in m["alarm_bits"] if a["name"] == "EB_FS")
    assert not client.write_register(305, 0b011, slave=1).isError()
    assert ctl("emergency on") == "ok"
    assert read(client, eb["register"], 1)[0] & (1 << eb["bit"])
    assert read(client, 320, 1) == [3]
    assert ctl("emergency off") == "ok"
    # Released, the latched bit stays until the reset bit's rising edge.
    assert read(client, 320, 1) == [3]
    client.write_register(305, 0, slave=1)
    client.write_register(305, 0b1000, slave=1)
    client.write_register(305, 0, slave=1)
    assert read(client, 320, 1) == [1]
    assert read(client, 300, 4) == [0, 0, 0, 0]
    # Any alarm bit of the map can be injected; an unknown name is refused.
    assert ctl("alarm CP_HP_W") == "ok"
    assert read(client, 300, 1)[0] == 1 << 5
    assert read(client, 320, 1) == [1], "a warning does not trip the plant"
    assert ctl("alarm NOPE").startswith("error:")
    # Exceptions on demand.
    assert ctl("exception 4") == "ok"
    r = client.read_holding_registers(320, count=1, slave=1)
    assert r.isError() and r.exception_code == 4
    assert ctl("exception off") == "ok"
    assert read(client, 320, 1) == [1]
