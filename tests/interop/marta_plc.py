"""A MARTA PLC stand-in for the driver's tests: pymodbus's Modbus TCP server loaded
with the register map, every reading set to a known value, independent of the Rust code
(floats packed here with `struct`: big-endian bytes, low word first, as SPEC 10 says).

    marta_plc.py MAP.yaml PORT

Values: reading number i (in map order) is `i * 1.25 - 20`; the status word is 1; the
alarm bits EB_FS and CP_HP_W are set. Every register write a client makes is printed on
stderr as `write <register> <values>` (addresses as on the wire).
"""

from __future__ import annotations

import asyncio
import struct
import sys

import yaml
from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.server import StartAsyncTcpServer


def f32_low_word_first(v: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", v))
    return [lo, hi]


class LoggedBlock(ModbusSequentialDataBlock):
    """Prints client writes (after start-up)."""

    ready = False

    def setValues(self, address, values):  # noqa: N802 (pymodbus API)
        super().setValues(address, values)
        if LoggedBlock.ready:
            # The slave context passes wire address + 1 (pymodbus's 1-based blocks).
            print(f"write {address - 1} {list(values)}", file=sys.stderr, flush=True)


def main() -> None:
    map_path, port = sys.argv[1], int(sys.argv[2])
    with open(map_path) as f:
        m = yaml.safe_load(f)
    block = LoggedBlock(0, [0] * 400)
    ctx = ModbusServerContext(slaves={1: ModbusSlaveContext(hr=block)}, single=False)
    for i, r in enumerate(m["readings"]):
        ctx[1].setValues(3, r["register"], f32_low_word_first(i * 1.25 - 20))
    ctx[1].setValues(3, m["status"]["register"], [1])
    words: dict[int, int] = {}
    for a in m["alarm_bits"]:
        if a["name"] in ("EB_FS", "CP_HP_W"):
            words[a["register"]] = words.get(a["register"], 0) | (1 << a["bit"])
    for reg, w in words.items():
        ctx[1].setValues(3, reg, [w])
    LoggedBlock.ready = True
    print(f"marta_plc: ready on {port}", flush=True)
    asyncio.run(StartAsyncTcpServer(context=ctx, address=("127.0.0.1", port)))


if __name__ == "__main__":
    main()
