"""A minimal CAEN mainframe as a caproto IOC: an independent Channel Access server for
testing `caen-fsm` against something that is not our own `caen-sim`.

It serves, under `<prefix>:<board %02d>:<chan %03d>:`, every PV the FSM watches
(SPEC 4.1) for each LV and HV side given on the command line, plus
`<prefix>:ClearAlarm` (enum No/Yes). The only "physics": writing `Pw` On sets
`Status` 1 and `VMon` = `V0Set`; `Pw` Off sets `Status` 0 and `VMon` 0.

    python caen_ioc.py --prefix t --lv 0:0 --hv 12:0 [--lv 0:1 --hv 12:1] [--port P]

The CA port is `--port`, else `EPICS_CA_SERVER_PORT`; the interface is 127.0.0.1 only.
Once serving it prints (flushed) on stdout:

    caen-ioc: serving <N> PVs on CA port <udp> tcp <tcp>

and then one line per client write, in the order the IOC applied them:

    caen-ioc: write <pv> <value>

Repeated VERSION requests (libca-style clients re-send VERSION, e.g. on name-server
circuits; caproto takes a different "priority" in it as a protocol error and drops the
circuit) are tolerated: the second VERSION keeps the circuit's first priority, and a
line `caen-ioc: repeated VERSION tolerated ...` is printed so tests can tell it
happened.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def _say(line: str) -> None:
    print(f"caen-ioc: {line}", flush=True)


def _patch_repeated_version() -> None:
    """Keeps a circuit alive when a client sends VERSION again with another priority."""
    import caproto as ca
    from caproto import _circuit

    original = _circuit.VirtualCircuit._process_command
    if getattr(original, "_caen_ioc_patched", False):
        return

    def _process_command(self, role, command):
        if (
            isinstance(command, ca.VersionRequest)
            and self.priority is not None
            and command.priority != self.priority
        ):
            _say(
                f"repeated VERSION tolerated from {self.address}: priority "
                f"{command.priority} kept as {self.priority}"
            )
            command = ca.VersionRequest(priority=self.priority, version=command.version)
        return original(self, role, command)

    _process_command._caen_ioc_patched = True
    _circuit.VirtualCircuit._process_command = _process_command


class _QuietBeacons:
    """Beacons go to EPICS_CAS_BEACON_PORT on loopback; with no repeater listening there
    every send fails with ECONNREFUSED and caproto logs a full traceback each time. Keep
    the first one as one line, drop the rest."""

    def __init__(self):
        self.seen = False

    def filter(self, record) -> bool:
        if not record.getMessage().startswith("Failed to send beacon"):
            return True
        if not self.seen:
            self.seen = True
            _say(f"beacons not delivered (no repeater on the beacon port): {record.getMessage()[:60]}")
        return False


def _board_chan(text: str) -> tuple[int, int]:
    try:
        board, chan = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BOARD:CHAN, got {text!r}") from None
    if not (0 <= board <= 99 and 0 <= chan <= 999):
        raise argparse.ArgumentTypeError(f"board 0..99, chan 0..999: {text!r}")
    return board, chan


def build_pvdb(prefix: str, lv: list[tuple[int, int]], hv: list[tuple[int, int]]) -> dict:
    """The PV database: one group per LV/HV side, plus ClearAlarm."""
    from caproto import ChannelType
    from caproto.server import PVGroup, pvproperty

    def logged(name: str):
        """A putter that only logs the write (the value is stored as sent)."""

        async def putter(group, instance, value):
            _say(f"write {instance.pvname} {value}")
            return value

        putter.__name__ = f"put_{name}"
        return putter

    def setting(name: str, value: float, doc: str) -> pvproperty:
        return pvproperty(name=name, value=value, dtype=float, doc=doc, put=logged(name))

    def readback(name: str, value, dtype=float) -> pvproperty:
        return pvproperty(name=name, value=value, dtype=dtype, read_only=True)

    def enum(name: str, strings: tuple[str, str], doc: str) -> pvproperty:
        return pvproperty(
            name=name,
            value=strings[0],
            dtype=ChannelType.ENUM,
            enum_strings=strings,
            doc=doc,
            put=logged(name),
        )

    async def apply_pw(group, instance, value):
        """Pw On: Status 1, VMon = V0Set; Pw Off: Status 0, VMon 0."""
        _say(f"write {instance.pvname} {value}")
        on = value in ("On", 1)
        await group.Status.write(1 if on else 0)
        await group.VMon.write(group.V0Set.value if on else 0.0)
        return value

    class Side(PVGroup):
        V0Set = setting("V0Set", 0.0, "V")
        I0Set = setting("I0Set", 0.0, "current limit")
        Pw = pvproperty(
            name="Pw",
            value="Off",
            dtype=ChannelType.ENUM,
            enum_strings=("Off", "On"),
            put=apply_pw,
        )
        Trip = setting("Trip", 1.0, "s")
        TripInt = setting("TripInt", 0.0, "bit mask")
        TripExt = setting("TripExt", 0.0, "bit mask")
        Status = readback("Status", 0, int)
        VMon = readback("VMon", 0.0)
        IMon = readback("IMon", 0.0)

    class Lv(Side):
        UNVThr = setting("UNVThr", 0.0, "V")
        OVVThr = setting("OVVThr", 16.0, "V")
        RUpTime = setting("RUpTime", 1.0, "s")
        RDwTime = setting("RDwTime", 1.0, "s")
        Temp = readback("Temp", 25.0)

    class Hv(Side):
        RUp = setting("RUp", 50.0, "V/s")
        RDWn = setting("RDWn", 50.0, "V/s")
        PDwn = enum("PDwn", ("Kill", "Ramp"), "what switching off does")
        ImRange = enum("ImRange", ("Low", "High"), "current range")

    class Common(PVGroup):
        async def _clear(group, instance, value):
            _say(f"write {instance.pvname} {value}")
            return "No"  # a command, not a state: reads back No

        ClearAlarm = pvproperty(
            name="ClearAlarm",
            value="No",
            dtype=ChannelType.ENUM,
            enum_strings=("No", "Yes"),
            put=_clear,
        )

    pvdb: dict = {}
    groups = [Common(prefix=f"{prefix}:")]
    groups += [Lv(prefix=f"{prefix}:{b:02d}:{c:03d}:") for b, c in lv]
    groups += [Hv(prefix=f"{prefix}:{b:02d}:{c:03d}:") for b, c in hv]
    for g in groups:
        for name in g.pvdb:
            if name in pvdb:
                raise SystemExit(f"caen-ioc: {name} defined twice (same board:chan as LV and HV?)")
        pvdb.update(g.pvdb)
    return pvdb


async def _serve(pvdb: dict) -> None:
    from caproto.asyncio.server import Context

    ctx = Context(pvdb, interfaces=["127.0.0.1"])

    async def ready(_async_lib):
        _say(f"serving {len(pvdb)} PVs on CA port {ctx.ca_server_port} tcp {ctx.port}")

    await ctx.run(startup_hook=ready)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", required=True)
    p.add_argument("--lv", type=_board_chan, action="append", default=[], metavar="B:C")
    p.add_argument("--hv", type=_board_chan, action="append", default=[], metavar="B:C")
    p.add_argument("--port", type=int, help="CA port (default: EPICS_CA_SERVER_PORT)")
    p.add_argument("--strict-version", action="store_true",
                   help="do not tolerate repeated VERSION requests (caproto as shipped)")
    args = p.parse_args(argv)
    if not args.lv and not args.hv:
        p.error("give at least one --lv or --hv")
    # caproto reads the environment when the server context is built.
    if args.port is not None:
        os.environ["EPICS_CA_SERVER_PORT"] = str(args.port)
    os.environ.setdefault("EPICS_CAS_INTF_ADDR_LIST", "127.0.0.1")
    os.environ.setdefault("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "NO")
    os.environ.setdefault("EPICS_CAS_BEACON_ADDR_LIST", "127.0.0.1")
    if not args.strict_version:
        _patch_repeated_version()
    import logging

    logging.getLogger("caproto.ctx").addFilter(_QuietBeacons())
    pvdb = build_pvdb(args.prefix, args.lv, args.hv)
    try:
        asyncio.run(_serve(pvdb))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
