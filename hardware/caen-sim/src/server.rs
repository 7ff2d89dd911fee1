//! The Channel Access side: PVs and their write hooks, the physics tick, the state file.
//!
//! Client writes are applied to the model inside the write hook (under one mutex) and
//! the PVs that changed are posted at once, so a `caput -c` is visible to the next
//! `caget`. The tick advances the physics and posts only the PVs whose value changed,
//! so monitors see exactly the changes.
//!
//! The CA server runs on a runtime of its own, on its own thread: the server leaves
//! tasks (listener, responder, one per client) behind when its `run` future is dropped,
//! and dropping that runtime is what really closes its sockets when [`run`] returns.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use dcs_shared::shutdown::CancellationToken;
use epics_base_rs::error::CaError;
use epics_base_rs::server::database::PvDatabase;
use epics_base_rs::server::pv::{
    AccessDecision, AccessHook, ProcessVariable, PvMetadata, WriteContext, WriteHook,
};
use epics_base_rs::server::snapshot::{DisplayInfo, EnumInfo};
use epics_base_rs::types::{EpicsValue, PvString};
use epics_ca_rs::server::CaServer;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::config::{SideSpec, SimConfig};
use crate::model::{valid_setting, Channel, CurrentRange, Kind, PowerDown, Saved, Sensor};

/// Labels of `Pw`.
const PW_LABELS: &[&str] = &["Off", "On"];
/// Labels of `PDwn` (index 0 = Kill).
const PDWN_LABELS: &[&str] = &["Kill", "Ramp"];
/// Labels of `ImRange` (index 0 = Low).
const IMRANGE_LABELS: &[&str] = &["Low", "High"];
/// Labels of `<prefix>:ClearAlarm`.
const CLEAR_LABELS: &[&str] = &["No", "Yes"];

/// The state file is rewritten at most this often while something changes.
const SAVE_INTERVAL: Duration = Duration::from_millis(200);
/// How long the CA runtime may take to drop its tasks on shutdown.
const CA_STOP_GRACE: Duration = Duration::from_millis(300);
/// Version of the state file format.
const STATE_VERSION: u32 = 1;

/// One parameter (PV suffix) of a mainframe channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// Voltage set-point.
    V0Set,
    /// Current limit.
    I0Set,
    /// Power switch (enum Off/On).
    Pw,
    /// Overcurrent duration before trip, s.
    Trip,
    /// Internal trip mask.
    TripInt,
    /// External trip mask.
    TripExt,
    /// Status word (read-only).
    Status,
    /// Output voltage (read-only).
    VMon,
    /// Output current (read-only).
    IMon,
    /// LV undervoltage threshold.
    UnvThr,
    /// LV overvoltage threshold.
    OvvThr,
    /// LV ramp-up time, s.
    RUpTime,
    /// LV ramp-down time, s.
    RDwTime,
    /// LV board temperature (read-only).
    Temp,
    /// HV ramp-up rate, V/s.
    RUp,
    /// HV ramp-down rate, V/s.
    RDWn,
    /// HV power-down mode (enum Kill/Ramp).
    PDwn,
    /// HV current range (enum Low/High).
    ImRange,
    /// Fault injection: write non-zero to trip now.
    SimTrip,
    /// Fault injection: 1 unplugs, 0 replugs.
    SimUnplug,
    /// Fault injection: load override (ohm LV, MOhm HV); 0 = default.
    SimLoad,
}

const COMMON: &[Param] = &[
    Param::V0Set,
    Param::I0Set,
    Param::Pw,
    Param::Trip,
    Param::TripInt,
    Param::TripExt,
    Param::Status,
    Param::VMon,
    Param::IMon,
];
const LV_ONLY: &[Param] = &[
    Param::UnvThr,
    Param::OvvThr,
    Param::RUpTime,
    Param::RDwTime,
    Param::Temp,
];
const HV_ONLY: &[Param] = &[Param::RUp, Param::RDWn, Param::PDwn, Param::ImRange];
const FAULTS: &[Param] = &[Param::SimTrip, Param::SimUnplug, Param::SimLoad];

impl Param {
    /// Every PV of a channel of this kind, device PVs first, then fault injection.
    pub fn all(kind: Kind) -> Vec<Param> {
        let only = match kind {
            Kind::Lv => LV_ONLY,
            Kind::Hv => HV_ONLY,
        };
        [COMMON, only, FAULTS].concat()
    }

    /// The PV suffix, as on the real mainframe.
    pub fn name(self) -> &'static str {
        match self {
            Param::V0Set => "V0Set",
            Param::I0Set => "I0Set",
            Param::Pw => "Pw",
            Param::Trip => "Trip",
            Param::TripInt => "TripInt",
            Param::TripExt => "TripExt",
            Param::Status => "Status",
            Param::VMon => "VMon",
            Param::IMon => "IMon",
            Param::UnvThr => "UNVThr",
            Param::OvvThr => "OVVThr",
            Param::RUpTime => "RUpTime",
            Param::RDwTime => "RDwTime",
            Param::Temp => "Temp",
            Param::RUp => "RUp",
            Param::RDWn => "RDWn",
            Param::PDwn => "PDwn",
            Param::ImRange => "ImRange",
            Param::SimTrip => "SimTrip",
            Param::SimUnplug => "SimUnplug",
            Param::SimLoad => "SimLoad",
        }
    }

    /// Whether client writes are refused.
    pub fn read_only(self) -> bool {
        matches!(
            self,
            Param::Status | Param::VMon | Param::IMon | Param::Temp
        )
    }

    /// Enum labels, for enum PVs.
    fn labels(self) -> Option<&'static [&'static str]> {
        match self {
            Param::Pw => Some(PW_LABELS),
            Param::PDwn => Some(PDWN_LABELS),
            Param::ImRange => Some(IMRANGE_LABELS),
            _ => None,
        }
    }

    /// Engineering units of a double PV.
    fn units(self, kind: Kind) -> &'static str {
        let amps = match kind {
            Kind::Lv => "A",
            Kind::Hv => "uA",
        };
        match self {
            Param::V0Set | Param::VMon | Param::UnvThr | Param::OvvThr => "V",
            Param::I0Set | Param::IMon => amps,
            Param::Trip | Param::RUpTime | Param::RDwTime => "s",
            Param::RUp | Param::RDWn => "V/s",
            Param::Temp => "degC",
            Param::SimLoad => match kind {
                Kind::Lv => "Ohm",
                Kind::Hv => "MOhm",
            },
            _ => "",
        }
    }

    /// The PV value for the channel's current state.
    fn value(self, ch: &Channel) -> EpicsValue {
        let s = ch.settings();
        match self {
            Param::V0Set => EpicsValue::Double(s.v0set),
            Param::I0Set => EpicsValue::Double(s.i0set),
            Param::Pw => EpicsValue::Enum(u16::from(ch.pw())),
            Param::Trip => EpicsValue::Double(s.trip),
            Param::TripInt => EpicsValue::Double(s.trip_int),
            Param::TripExt => EpicsValue::Double(s.trip_ext),
            // The word has 16 bits: it always fits.
            Param::Status => EpicsValue::Long(i32::try_from(ch.status()).unwrap_or(i32::MAX)),
            Param::VMon => EpicsValue::Double(ch.vmon()),
            Param::IMon => EpicsValue::Double(ch.imon()),
            Param::UnvThr => EpicsValue::Double(s.unv_thr),
            Param::OvvThr => EpicsValue::Double(s.ovv_thr),
            Param::RUpTime => EpicsValue::Double(s.rup_time),
            Param::RDwTime => EpicsValue::Double(s.rdw_time),
            Param::Temp => EpicsValue::Double(ch.temp()),
            Param::RUp => EpicsValue::Double(s.rup),
            Param::RDWn => EpicsValue::Double(s.rdwn),
            Param::PDwn => EpicsValue::Enum(match s.pdwn {
                PowerDown::Kill => 0,
                PowerDown::Ramp => 1,
            }),
            Param::ImRange => EpicsValue::Enum(match s.im_range {
                CurrentRange::Low => 0,
                CurrentRange::High => 1,
            }),
            Param::SimTrip => EpicsValue::Long(0),
            Param::SimUnplug => EpicsValue::Long(i32::from(ch.unplugged())),
            Param::SimLoad => EpicsValue::Double(ch.load()),
        }
    }

    /// Applies a client write to the channel.
    fn write(self, ch: &mut Channel, v: &EpicsValue) -> Result<Applied, WriteError> {
        if self.read_only() {
            return Err(WriteError::ReadOnly);
        }
        if let Some(labels) = self.labels() {
            let idx = choice(v, labels)
                .ok_or_else(|| WriteError::Invalid(format!("not one of {labels:?} or an index")))?;
            match self {
                Param::Pw => {
                    if !ch.set_pw(idx == 1) {
                        return Ok(Applied::Ignored("channel unplugged"));
                    }
                }
                Param::PDwn => {
                    ch.settings_mut().pdwn = if idx == 0 {
                        PowerDown::Kill
                    } else {
                        PowerDown::Ramp
                    }
                }
                _ => {
                    ch.settings_mut().im_range = if idx == 0 {
                        CurrentRange::Low
                    } else {
                        CurrentRange::High
                    }
                }
            }
            return Ok(Applied::Done);
        }
        let x = number(v).ok_or_else(|| WriteError::Invalid("not a number".into()))?;
        if !valid_setting(x) {
            return Err(WriteError::Invalid("must be a finite number >= 0".into()));
        }
        let s = ch.settings_mut();
        match self {
            Param::V0Set => s.v0set = x,
            Param::I0Set => s.i0set = x,
            Param::Trip => s.trip = x,
            Param::TripInt => s.trip_int = x,
            Param::TripExt => s.trip_ext = x,
            Param::UnvThr => s.unv_thr = x,
            Param::OvvThr => s.ovv_thr = x,
            Param::RUpTime => s.rup_time = x,
            Param::RDwTime => s.rdw_time = x,
            Param::RUp => s.rup = x,
            Param::RDWn => s.rdwn = x,
            Param::SimTrip => {
                if x == 0.0 {
                    return Ok(Applied::Ignored("0 does nothing"));
                }
                ch.force_trip();
            }
            Param::SimUnplug => ch.set_unplugged(x != 0.0),
            Param::SimLoad => ch.set_load(x),
            // Enums and read-only PVs were handled above.
            _ => return Err(WriteError::ReadOnly),
        }
        Ok(Applied::Done)
    }
}

/// Outcome of an accepted write.
enum Applied {
    Done,
    Ignored(&'static str),
}

/// Why a write was refused.
#[derive(Debug)]
enum WriteError {
    ReadOnly,
    Invalid(String),
}

/// A string as sent over CA, without padding.
fn text(s: &PvString) -> String {
    s.as_str_lossy()
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

/// A scalar number in any form a client may send: numeric types, enum index, or a
/// numeric string ("12.5", "0x10").
fn number(v: &EpicsValue) -> Option<f64> {
    match v {
        EpicsValue::String(s) => {
            let t = text(s);
            t.parse::<f64>()
                .ok()
                .or_else(|| EpicsValue::String(PvString::from(t.as_str())).to_f64())
        }
        other => other.to_f64(),
    }
}

/// An enum index from a label (case-sensitive, as CA), an index, or a numeric string.
fn choice(v: &EpicsValue, labels: &[&str]) -> Option<usize> {
    if let EpicsValue::String(s) = v {
        let t = text(s);
        if let Some(i) = labels.iter().position(|l| *l == t) {
            return Some(i);
        }
    }
    let x = number(v)?;
    let in_range = x.fract() == 0.0 && x >= 0.0 && x < labels.len() as f64;
    // Checked just above: a small non-negative integer.
    in_range.then_some(x as usize)
}

/// One mainframe channel with its PVs and the values last posted to them.
struct Side {
    spec: SideSpec,
    ch: Channel,
    pvs: Vec<(Param, Arc<ProcessVariable>)>,
    posted: Vec<EpicsValue>,
}

impl Side {
    /// Posts the PVs whose value changed since the last post.
    fn publish(&mut self) {
        for ((param, pv), last) in self.pvs.iter().zip(self.posted.iter_mut()) {
            let v = param.value(&self.ch);
            if v != *last {
                pv.set(v.clone());
                *last = v;
            }
        }
    }
}

struct State {
    sides: Vec<Side>,
}

type Shared = Arc<Mutex<State>>;

/// Locks the state. Nothing panics while holding it; recover rather than propagate a
/// poisoning anyway, a simulator must keep serving.
fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The base of a channel's PV names: `<prefix>:<bb>:<ccc>`.
pub fn pv_base(prefix: &str, board: u32, chan: u32) -> String {
    format!("{prefix}:{board:02}:{chan:03}")
}

/// A write hook for one channel parameter.
fn side_hook(shared: Shared, index: usize, param: Param, name: String) -> WriteHook {
    Arc::new(move |value: EpicsValue, ctx: WriteContext| {
        let result = side_write(&shared, index, param, &name, &value, &ctx);
        Box::pin(async move { result })
    })
}

fn side_write(
    shared: &Mutex<State>,
    index: usize,
    param: Param,
    name: &str,
    value: &EpicsValue,
    ctx: &WriteContext,
) -> Result<(), CaError> {
    tracing::debug!(pv = name, value = %value, client = %ctx.peer, "write");
    let mut state = lock(shared);
    let Some(side) = state.sides.get_mut(index) else {
        return Err(CaError::ChannelNotFound(name.to_string()));
    };
    match param.write(&mut side.ch, value) {
        Ok(Applied::Done) => {
            // Completes instant ramps now, so the readback is final when the put returns.
            side.ch.step(0.0);
            side.publish();
            Ok(())
        }
        Ok(Applied::Ignored(why)) => {
            tracing::info!(pv = name, value = %value, "write ignored: {why}");
            side.publish();
            Ok(())
        }
        Err(WriteError::ReadOnly) => {
            tracing::warn!(pv = name, value = %value, "write refused: read-only");
            Err(CaError::ReadOnlyField(name.to_string()))
        }
        Err(WriteError::Invalid(why)) => {
            tracing::warn!(pv = name, value = %value, "write refused: {why}");
            Err(CaError::InvalidValue(format!("{name}: {why}")))
        }
    }
}

/// The hook of `<prefix>:ClearAlarm`: Yes (1) clears the latches of every channel. The
/// PV itself stays No.
fn clear_alarm_hook(shared: Shared, name: String) -> WriteHook {
    Arc::new(move |value: EpicsValue, ctx: WriteContext| {
        tracing::debug!(pv = %name, value = %value, client = %ctx.peer, "write");
        let result = match choice(&value, CLEAR_LABELS) {
            Some(1) => {
                let mut state = lock(&shared);
                for side in &mut state.sides {
                    side.ch.clear_alarm();
                    side.publish();
                }
                tracing::info!("alarms cleared on every channel");
                Ok(())
            }
            Some(_) => Ok(()),
            None => {
                tracing::warn!(pv = %name, value = %value, "write refused: not No/Yes");
                Err(CaError::InvalidValue(format!("{name}: not one of No, Yes")))
            }
        };
        Box::pin(async move { result })
    })
}

/// Access rights of read-only PVs: clients see them as not writable.
fn read_only_access() -> AccessHook {
    Arc::new(|_user: &str, _host: &str| AccessDecision {
        read: true,
        write: false,
    })
}

fn enum_metadata(labels: &[&str]) -> PvMetadata {
    PvMetadata {
        display: None,
        control: None,
        enums: Some(EnumInfo::new(
            labels.iter().map(|l| PvString::from(*l)).collect(),
        )),
    }
}

fn double_metadata(units: &str) -> PvMetadata {
    PvMetadata {
        display: Some(DisplayInfo {
            units: PvString::from(units),
            precision: 3,
            ..DisplayInfo::default()
        }),
        control: None,
        enums: None,
    }
}

// ---------------------------------------------------------------------------------------
// State file

/// The state file: what a mainframe keeps while its IOC restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    channels: Vec<SavedEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SavedEntry {
    kind: Kind,
    board: u32,
    chan: u32,
    #[serde(flatten)]
    saved: Saved,
}

fn snapshot(state: &State) -> StateFile {
    StateFile {
        version: STATE_VERSION,
        channels: state
            .sides
            .iter()
            .map(|s| SavedEntry {
                kind: s.spec.kind,
                board: s.spec.addr.board,
                chan: s.spec.addr.chan,
                saved: s.ch.saved(),
            })
            .collect(),
    }
}

/// Loads the state file into the channels. Problems are logged, never fatal: a
/// mainframe that lost its memory starts from its defaults.
fn restore(path: &Path, channels: &mut [(SideSpec, Channel)]) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no state file yet: starting from defaults");
            return;
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read state file: ignored");
            return;
        }
    };
    let file: StateFile = match serde_json::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "corrupt state file: ignored");
            return;
        }
    };
    if file.version != STATE_VERSION {
        tracing::warn!(path = %path.display(), version = file.version, "unknown state file version: ignored");
        return;
    }
    let mut restored = 0;
    for entry in &file.channels {
        let found = channels
            .iter_mut()
            .find(|(spec, _)| spec.addr.board == entry.board && spec.addr.chan == entry.chan);
        match found {
            None => tracing::info!(
                board = entry.board,
                chan = entry.chan,
                "state file: channel no longer configured: ignored"
            ),
            Some((spec, _)) if spec.kind != entry.kind => tracing::warn!(
                board = entry.board,
                chan = entry.chan,
                "state file: channel changed between LV and HV: ignored"
            ),
            Some((_, ch)) => match ch.restore(&entry.saved) {
                Ok(()) => restored += 1,
                Err(e) => tracing::warn!(
                    board = entry.board,
                    chan = entry.chan,
                    error = %e,
                    "state file: bad entry: ignored"
                ),
            },
        }
    }
    tracing::info!(path = %path.display(), restored, "state restored");
}

/// Writes the state file atomically (temp file + rename), at most every
/// [`SAVE_INTERVAL`] and only when something changed.
struct Persister {
    path: PathBuf,
    written: Option<StateFile>,
    at: Option<Instant>,
    failing: bool,
}

impl Persister {
    fn new(path: PathBuf) -> Persister {
        Persister {
            path,
            written: None,
            at: None,
            failing: false,
        }
    }

    /// Saves `state` if it changed and, unless `force`, if the last write is old enough.
    async fn save(&mut self, state: StateFile, force: bool) {
        if self.written.as_ref() == Some(&state) {
            return;
        }
        if !force && self.at.is_some_and(|t| t.elapsed() < SAVE_INTERVAL) {
            return;
        }
        self.at = Some(Instant::now());
        match self.write(&state).await {
            Ok(()) => {
                if self.failing {
                    tracing::info!(path = %self.path.display(), "state file written again");
                }
                self.failing = false;
                self.written = Some(state);
            }
            Err(e) => {
                // Once per failure streak, not every 200 ms.
                if !self.failing {
                    tracing::warn!(path = %self.path.display(), error = %format!("{e:#}"), "cannot write state file");
                }
                self.failing = true;
            }
        }
    }

    async fn write(&self, state: &StateFile) -> anyhow::Result<()> {
        let data = serde_json::to_vec_pretty(state)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        // No fsync: this guards against the simulator being killed, not the host.
        tokio::fs::write(&tmp, &data)
            .await
            .with_context(|| format!("writing {}", tmp.display()))?;
        tokio::fs::rename(&tmp, &self.path)
            .await
            .with_context(|| format!("renaming {} to {}", tmp.display(), self.path.display()))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// CA server thread

struct CaHandle {
    db: Arc<PvDatabase>,
    port: u16,
    tcp_port: u16,
    stop: CancellationToken,
    /// Reports the end of the server thread; `None` once consumed.
    done: Option<oneshot::Receiver<Result<(), String>>>,
}

/// Starts the CA server on a runtime and thread of its own (see the module docs).
async fn start_ca(port: u16) -> anyhow::Result<CaHandle> {
    type Ready = Result<(Arc<PvDatabase>, u16, u16), String>;
    let (ready_tx, ready_rx) = oneshot::channel::<Ready>();
    let (done_tx, done_rx) = oneshot::channel::<Result<(), String>>();
    let stop = CancellationToken::new();
    let stop_ca = stop.clone();
    std::thread::Builder::new()
        .name("caen-sim-ca".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("caen-sim-ca")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start a runtime: {e}")));
                    return;
                }
            };
            let result = rt.block_on(async move {
                let server = match CaServer::builder().port(port).build().await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot serve CA on port {port}: {e}")));
                        return Ok(());
                    }
                };
                let db = server.database().clone();
                let _ = ready_tx.send(Ok((db, server.udp_port(), server.tcp_port())));
                tokio::select! {
                    r = server.run() => r.map_err(|e| format!("CA server stopped: {e}")),
                    _ = stop_ca.cancelled() => Ok(()),
                }
            });
            // Dropping the runtime's tasks closes the server's sockets.
            rt.shutdown_timeout(CA_STOP_GRACE);
            let _ = done_tx.send(result);
        })
        .context("cannot start the CA server thread")?;
    let (db, port, tcp_port) = ready_rx
        .await
        .map_err(|_| anyhow::anyhow!("the CA server thread died while starting"))?
        .map_err(anyhow::Error::msg)?;
    Ok(CaHandle {
        db,
        port,
        tcp_port,
        stop,
        done: Some(done_rx),
    })
}

// ---------------------------------------------------------------------------------------
// run

/// Runs the simulated mainframe until `shutdown` is cancelled.
///
/// Prints `caen-sim: serving <N> channels (<M> PVs) on CA port <port>` on stdout once
/// every PV is served (N counts mainframe channels: LV and HV sides separately; M
/// includes `ClearAlarm` and the fault PVs). Returns within about half a second of
/// `shutdown`, after a last write of the state file, with the CA port closed.
pub async fn run(cfg: SimConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    dcs_shared::Validate::validate(&cfg).map_err(|(k, m)| anyhow::anyhow!("config: `{k}`: {m}"))?;
    let specs = cfg.sides();
    let mut channels: Vec<(SideSpec, Channel)> = specs
        .into_iter()
        .map(|spec| {
            let (load, seed) = match spec.kind {
                Kind::Lv => (cfg.sim.lv_load_ohms, 0),
                Kind::Hv => (cfg.sim.hv_load_mohms, 1),
            };
            let seed = seed + 2 * (u64::from(spec.addr.board) * 1000 + u64::from(spec.addr.chan));
            let sensor = (cfg.sim.hv_leak_ua > 0.0).then(|| Sensor {
                leak_ua: cfg.sim.hv_leak_ua,
                breakdown_v: cfg.sim.breakdown_volts.get(&spec.channel.0).copied(),
            });
            let ch = Channel::new(spec.kind, load, cfg.sim.noise, seed).with_sensor(sensor);
            (spec, ch)
        })
        .collect();
    if let Some(path) = &cfg.sim.state_file {
        restore(path, &mut channels);
    }
    let state: Shared = Arc::new(Mutex::new(State {
        sides: channels
            .into_iter()
            .map(|(spec, ch)| Side {
                spec,
                ch,
                pvs: Vec::new(),
                posted: Vec::new(),
            })
            .collect(),
    }));

    let mut ca = start_ca(cfg.port()).await?;
    let result = serve(&cfg, &state, &mut ca, &shutdown).await;
    ca.stop.cancel();
    if let Some(done) = ca.done.take() {
        match tokio::time::timeout(CA_STOP_GRACE * 2, done).await {
            Ok(Ok(Err(e))) => tracing::warn!("{e}"),
            Ok(_) => {}
            Err(_) => tracing::warn!("the CA server did not stop in time"),
        }
    }
    tracing::info!("stopped");
    result
}

/// Registers the PVs, announces readiness and runs the tick loop.
async fn serve(
    cfg: &SimConfig,
    state: &Shared,
    ca: &mut CaHandle,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let db = &ca.db;
    let mut count = 0usize;
    let n_sides = lock(state).sides.len();
    for index in 0..n_sides {
        // Built under the lock, registered outside it: `add_pv*` is async.
        let (spec, initial) = {
            let st = lock(state);
            let Some(side) = st.sides.get(index) else {
                continue;
            };
            let initial: Vec<(Param, EpicsValue)> = Param::all(side.spec.kind)
                .into_iter()
                .map(|p| (p, p.value(&side.ch)))
                .collect();
            (side.spec.clone(), initial)
        };
        let base = pv_base(&cfg.prefix, spec.addr.board, spec.addr.chan);
        let mut pvs = Vec::with_capacity(initial.len());
        let mut posted = Vec::with_capacity(initial.len());
        for (param, value) in initial {
            let name = format!("{base}:{}", param.name());
            let hook = side_hook(state.clone(), index, param, name.clone());
            let access = param.read_only().then(read_only_access);
            db.add_pv_with_hooks(&name, value.clone(), hook, access)
                .await
                .with_context(|| format!("cannot add PV {name}"))?;
            let pv = db
                .find_pv(&name)
                .await
                .with_context(|| format!("PV {name} vanished"))?;
            match param.labels() {
                Some(labels) => pv.set_metadata(enum_metadata(labels)),
                None if matches!(value, EpicsValue::Double(_)) => {
                    pv.set_metadata(double_metadata(param.units(spec.kind)))
                }
                None => {}
            }
            pvs.push((param, pv));
            posted.push(value);
            count += 1;
        }
        let mut st = lock(state);
        let Some(side) = st.sides.get_mut(index) else {
            continue;
        };
        side.pvs = pvs;
        side.posted = posted;
        // A write may have landed between registration and now.
        side.publish();
    }
    let clear = format!("{}:ClearAlarm", cfg.prefix);
    db.add_pv_with_hook(
        &clear,
        EpicsValue::Enum(0),
        clear_alarm_hook(state.clone(), clear.clone()),
    )
    .await
    .with_context(|| format!("cannot add PV {clear}"))?;
    if let Some(pv) = db.find_pv(&clear).await {
        pv.set_metadata(enum_metadata(CLEAR_LABELS));
    }
    count += 1;

    if ca.tcp_port != ca.port {
        tracing::warn!(
            udp = ca.port,
            tcp = ca.tcp_port,
            "TCP port differs from the search port (port in use?)"
        );
    }
    tracing::info!(
        channels = n_sides,
        pvs = count,
        port = ca.port,
        prefix = %cfg.prefix,
        "serving"
    );
    println!(
        "caen-sim: serving {n_sides} channels ({count} PVs) on CA port {}",
        ca.port
    );

    let mut persister = cfg.sim.state_file.clone().map(Persister::new);
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.sim.tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    let mut outcome = Ok(());
    loop {
        let server_end = async {
            match ca.done.as_mut() {
                Some(done) => done.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            end = server_end => {
                // A simulator without its server must not linger looking healthy.
                ca.done = None;
                outcome = Err(match end {
                    Ok(Err(e)) => anyhow::anyhow!(e),
                    _ => anyhow::anyhow!("the CA server stopped"),
                });
                break;
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let dt = now.duration_since(last).as_secs_f64();
                last = now;
                let saved = {
                    let mut st = lock(state);
                    for side in &mut st.sides {
                        side.ch.step(dt);
                        side.publish();
                    }
                    persister.as_ref().map(|_| snapshot(&st))
                };
                if let (Some(p), Some(s)) = (persister.as_mut(), saved) {
                    p.save(s, false).await;
                }
            }
        }
    }
    if let Some(p) = persister.as_mut() {
        let s = snapshot(&lock(state));
        p.save(s, true).await;
    }
    outcome
}

/// Every PV name the simulator serves for `cfg`, in registration order (for tools and
/// tests).
pub fn pv_names(cfg: &SimConfig) -> Vec<String> {
    let mut names: Vec<String> = cfg
        .sides()
        .iter()
        .flat_map(|s| {
            let base = pv_base(&cfg.prefix, s.addr.board, s.addr.chan);
            Param::all(s.kind)
                .into_iter()
                .map(move |p| format!("{base}:{}", p.name()))
        })
        .collect();
    names.push(format!("{}:ClearAlarm", cfg.prefix));
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BIT_INTERNAL_TRIP;

    fn s(v: &str) -> EpicsValue {
        EpicsValue::String(PvString::from(v))
    }

    #[test]
    fn numbers_in_every_form() {
        assert_eq!(number(&EpicsValue::Double(12.5)), Some(12.5));
        assert_eq!(number(&EpicsValue::Long(3)), Some(3.0));
        assert_eq!(number(&EpicsValue::Enum(1)), Some(1.0));
        assert_eq!(number(&s("12.5")), Some(12.5));
        assert_eq!(number(&s(" 7 \0\0")), Some(7.0));
        assert_eq!(number(&s("0x10")), Some(16.0));
        assert_eq!(number(&s("twelve")), None);
    }

    #[test]
    fn choices() {
        assert_eq!(choice(&s("On"), PW_LABELS), Some(1));
        assert_eq!(choice(&s("Off"), PW_LABELS), Some(0));
        assert_eq!(choice(&s("on"), PW_LABELS), None, "case-sensitive");
        assert_eq!(choice(&s("1"), PW_LABELS), Some(1));
        assert_eq!(choice(&EpicsValue::Enum(1), PW_LABELS), Some(1));
        assert_eq!(choice(&EpicsValue::Enum(2), PW_LABELS), None);
        assert_eq!(choice(&EpicsValue::Double(0.5), PW_LABELS), None);
        assert_eq!(choice(&EpicsValue::Long(-1), PW_LABELS), None);
        assert_eq!(choice(&s("Ramp"), PDWN_LABELS), Some(1));
    }

    #[test]
    fn writes_are_validated() {
        let mut ch = Channel::new(Kind::Hv, 100.0, 0.0, 1);
        assert!(Param::V0Set.write(&mut ch, &s("20")).is_ok());
        assert_eq!(ch.settings().v0set, 20.0);
        assert!(Param::V0Set
            .write(&mut ch, &EpicsValue::Double(-1.0))
            .is_err());
        assert!(Param::V0Set
            .write(&mut ch, &EpicsValue::Double(f64::NAN))
            .is_err());
        assert!(Param::RUp.write(&mut ch, &s("x")).is_err());
        assert!(matches!(
            Param::VMon.write(&mut ch, &EpicsValue::Double(1.0)),
            Err(WriteError::ReadOnly)
        ));
        assert!(Param::PDwn.write(&mut ch, &s("Ramp")).is_ok());
        assert_eq!(ch.settings().pdwn, PowerDown::Ramp);
        assert!(Param::ImRange.write(&mut ch, &EpicsValue::Enum(1)).is_ok());
        assert_eq!(Param::ImRange.value(&ch), EpicsValue::Enum(1));
        assert!(Param::Pw.write(&mut ch, &s("Maybe")).is_err());
        assert!(Param::Pw.write(&mut ch, &s("On")).is_ok());
        assert!(ch.pw());
        assert!(Param::SimTrip.write(&mut ch, &EpicsValue::Long(1)).is_ok());
        assert!(!ch.pw());
        assert_eq!(ch.status() & BIT_INTERNAL_TRIP, BIT_INTERNAL_TRIP);
        assert!(Param::SimUnplug
            .write(&mut ch, &EpicsValue::Long(1))
            .is_ok());
        assert!(matches!(
            Param::Pw.write(&mut ch, &EpicsValue::Enum(1)),
            Ok(Applied::Ignored(_))
        ));
        assert!(Param::SimLoad.write(&mut ch, &s("2.5")).is_ok());
        assert_eq!(ch.load(), 2.5);
    }

    #[test]
    fn pv_list() {
        let cfg: SimConfig = dcs_shared::config::from_str(
            "prefix: p\nchannels: {\"0\": {lv: {board: 0, chan: 3}, hv: {board: 12, chan: 3}}}\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let names = pv_names(&cfg);
        assert_eq!(names.len(), 17 + 16 + 1);
        let idx: std::collections::HashSet<String> = names.into_iter().collect();
        for n in [
            "p:00:003:V0Set",
            "p:00:003:Temp",
            "p:00:003:RUpTime",
            "p:00:003:SimLoad",
            "p:12:003:RDWn",
            "p:12:003:ImRange",
            "p:12:003:SimTrip",
            "p:ClearAlarm",
        ] {
            assert!(idx.contains(n), "{n}");
        }
        assert!(!idx.contains("p:12:003:Temp"));
        assert!(!idx.contains("p:00:003:PDwn"));
    }

    #[test]
    fn state_file_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        let spec = |kind, board, chan| SideSpec {
            kind,
            addr: crate::config::Address { board, chan },
            channel: crate::config::ChannelKey("0".into()),
        };
        let mut hv = Channel::new(Kind::Hv, 100.0, 0.0, 1);
        hv.settings_mut().v0set = 150.0;
        hv.set_pw(true);
        hv.step(1.0);
        let state = State {
            sides: vec![Side {
                spec: spec(Kind::Hv, 12, 0),
                ch: hv.clone(),
                pvs: vec![],
                posted: vec![],
            }],
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut p = Persister::new(path.clone());
        rt.block_on(p.save(snapshot(&state), false));
        assert!(path.exists());

        let mut fresh = vec![
            (spec(Kind::Hv, 12, 0), Channel::new(Kind::Hv, 100.0, 0.0, 1)),
            (spec(Kind::Lv, 0, 0), Channel::new(Kind::Lv, 10.0, 0.0, 2)),
        ];
        restore(&path, &mut fresh);
        assert_eq!(fresh[0].1.saved(), hv.saved());
        assert!(fresh[0].1.pw());
        assert_eq!(fresh[1].1.saved().settings.v0set, 0.0);

        // Kind changed: ignored.
        let mut moved = vec![(spec(Kind::Lv, 12, 0), Channel::new(Kind::Lv, 10.0, 0.0, 2))];
        restore(&path, &mut moved);
        assert!(!moved[0].1.pw());

        std::fs::write(&path, b"{ not json").unwrap();
        let mut again = vec![(spec(Kind::Hv, 12, 0), Channel::new(Kind::Hv, 100.0, 0.0, 1))];
        restore(&path, &mut again);
        assert!(!again[0].1.pw(), "corrupt file ignored");
    }
}
