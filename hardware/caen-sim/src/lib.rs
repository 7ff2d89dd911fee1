//! `caen-sim`: a simulated CAEN SY4527 mainframe that is a real EPICS Channel Access
//! server (SPEC 4), so the `caen` service, caproto and pyepics talk to it as to the lab.
//!
//! # Configuration
//!
//! The same YAML file as the `caen` service (unknown keys are ignored): `prefix`
//! (default `cleanroom`), `channels` (each with an `lv` and/or `hv` `{board, chan}`),
//! and an optional `sim:` section: `port` (CA port for UDP search and TCP; default
//! `EPICS_CA_SERVER_PORT`, else 5064), `tick_ms` (50), `noise` (VMon jitter in V while
//! on; 0), `lv_load_ohms` (10), `hv_load_mohms` (100), `state_file` (relative to the
//! config file). See [`SimConfig`].
//!
//! Every PV starts from the hardware defaults below, never from the config's `setV`:
//! the `caen` service writes its settings itself.
//!
//! # PVs
//!
//! Per mainframe channel, under `<prefix>:<board %02d>:<chan %03d>:`:
//!
//! | PV | Type | LV | HV | Default | Notes |
//! |----|------|----|----|---------|-------|
//! | `V0Set` | double | yes | yes | 0 | V |
//! | `I0Set` | double | yes | yes | 5 A / 500 uA | current limit |
//! | `Pw` | enum `Off`/`On` | yes | yes | Off | |
//! | `Trip` | double | yes | yes | 1 | s of overcurrent before tripping |
//! | `TripInt`, `TripExt` | double | yes | yes | 0 | bit masks, stored only |
//! | `Status` | long | yes | yes | 0 | read-only, status word (below) |
//! | `VMon` | double | yes | yes | 0 | read-only, V |
//! | `IMon` | double | yes | yes | 0 | read-only, A (LV) / uA (HV) |
//! | `UNVThr`, `OVVThr` | double | yes | | 0, 16 | V, stored only |
//! | `RUpTime`, `RDwTime` | double | yes | | 1, 1 | s for a whole ramp; 0 = instant |
//! | `Temp` | double | yes | | 25 | read-only, 25 + 2 * IMon degC |
//! | `RUp`, `RDWn` | double | | yes | 50, 50 | V/s; 0 = instant |
//! | `PDwn` | enum `Kill`/`Ramp` | | yes | Kill | what switching off does |
//! | `ImRange` | enum `Low`/`High` | | yes | Low | stored only |
//!
//! Plus `<prefix>:ClearAlarm` (enum `No`/`Yes`): writing `Yes` (or 1) clears the
//! latched internal trip on every channel; the PV always reads back `No`.
//!
//! Writes are accepted as the client sends them: enum labels (case-sensitive, as CA),
//! indexes, numbers of any CA type, numeric strings. Settings must be finite and >= 0
//! (enums: an index in range); a bad write is refused with a CA error and logged, a
//! good one is stored and posted, so the PV reads back the written value as soon as
//! the put completes. Writes to read-only PVs are refused (and the channels report no
//! write access). Every client write is logged (`pv`, `value`).
//!
//! # Physics
//!
//! Status bits (SPEC 4.2): 0 ON, 1 ramping up, 2 ramping down, 3 overcurrent (while it
//! lasts), 9 internal trip (latched until ClearAlarm), 11 unplugged. So: LV or HV on
//! and steady = 1, ramping up = 3, ramping down after Pw Off = 4, tripped = 512 (+8
//! while the overcurrent persists, +4 while an HV with `PDwn = Ramp` ramps down).
//!
//! - `Pw On`: VMon ramps to V0Set (HV at `RUp`; LV covering V0Set in `RUpTime`), and
//!   follows later V0Set changes (HV down at `RDWn`, LV within `RDwTime`).
//! - `Pw Off`: HV with `PDwn = Kill` drops to 0 at once, with `Ramp` ramps at `RDWn`;
//!   LV ramps down over `RDwTime`.
//! - IMon = VMon / load (LV ohm -> A; HV MOhm -> uA). IMon > I0Set for longer than
//!   `Trip` s switches the channel off (Pw reads Off; HV follows PDwn, LV drops at once)
//!   and latches bit 9. A latched channel can be switched on again; bit 9 stays until
//!   ClearAlarm.
//! - After each tick only the PVs whose value changed are posted.
//!
//! # Fault injection
//!
//! Per channel, under the same base, with a plain `caput`:
//! - `SimTrip` (long): write 1 to trip the channel now (as a sustained overcurrent
//!   would). Reads back 0.
//! - `SimUnplug` (long): 1 unplugs the channel (VMon and IMon 0, Status bit 11 only
//!   plus a latched bit 9, `Pw` writes accepted but ignored); 0 replugs it (a channel
//!   still on ramps up again from 0).
//! - `SimLoad` (double): overrides the load, ohm for LV, MOhm for HV; 0 = the default
//!   from the config. E.g. LV at 10 V with `SimLoad` 1 draws 10 A, above the 5 A default
//!   limit.
//!
//! # State file
//!
//! A real mainframe keeps its channels on while its IOC restarts. With `sim.state_file`
//! set, the simulator saves every channel's settings, Pw, VMon, latched trip and fault
//! state (unplugged, load) as JSON, atomically (temp file + rename), at most every
//! 200 ms while something changes and once more on shutdown; on start it loads the file
//! if present, so a simulator killed with SIGKILL comes back with its channels as they
//! were (up to ~200 ms old). Entries for channels no longer configured (or moved
//! between LV and HV) are ignored; a missing, unreadable or corrupt file is logged and
//! the simulator starts from the defaults.
//!
//! # Process
//!
//! [`run`] prints one line `caen-sim: serving <N> channels (<M> PVs) on CA port <port>`
//! on stdout when every PV is served, where N counts mainframe channels (LV and HV
//! sides separately) and M includes ClearAlarm and the fault PVs. It returns promptly
//! when its token is cancelled. The binary calls [`loopback_env_defaults`] first, so
//! the CA server binds and beacons on loopback unless `EPICS_CAS_*` say otherwise.

pub mod config;
pub mod model;
pub mod server;

pub use config::SimConfig;
pub use server::{pv_names, run};

/// Environment defaults so that the CA server serves loopback only unless configured:
/// `EPICS_CAS_INTF_ADDR_LIST=127.0.0.1`, `EPICS_CAS_AUTO_BEACON_ADDR_LIST=NO`,
/// `EPICS_CAS_BEACON_ADDR_LIST=127.0.0.1`, each set only when absent.
///
/// Call it before any other thread exists (first thing in `main`, before building the
/// tokio runtime): changing the environment while another thread may read it is a data
/// race on most libcs. The EPICS crates read these variables once and cache them, so it
/// must also run before any CA server is built.
pub fn loopback_env_defaults() {
    for (key, value) in [
        ("EPICS_CAS_INTF_ADDR_LIST", "127.0.0.1"),
        ("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "NO"),
        ("EPICS_CAS_BEACON_ADDR_LIST", "127.0.0.1"),
    ] {
        if std::env::var_os(key).is_none() {
            // Sound: the caller guarantees the process is still single-threaded (see the
            // doc comment), so nothing reads the environment concurrently.
            std::env::set_var(key, value);
        }
    }
}

/// The `caen-sim` program (see [`dcs_shared::program`]).
pub struct CaenSim;

impl dcs_shared::program::Program for CaenSim {
    const NAME: &'static str = "caen-sim";
    const ABOUT: &'static str =
        "Simulated CAEN SY4527 mainframe: an EPICS Channel Access server (SPEC 4).";
    type Config = SimConfig;
    // Do not wait for stray blocking tasks: the state file is already written.
    const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::ZERO;

    fn before_threads() {
        loopback_env_defaults();
    }
    fn resolve_paths(cfg: &mut SimConfig, file: &std::path::Path) {
        cfg.resolve_paths(file);
    }
    async fn run(
        cfg: SimConfig,
        _file: std::path::PathBuf,
        _mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        run(cfg, shutdown).await
    }
}
