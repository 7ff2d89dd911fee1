//! The sequencer without I/O: messages, operator commands and the clock in, commands
//! to send, status, checkpoints and records out (like `services/interlock/src/engine.rs`).
//!
//! A run is the flattened sequence ([`crate::sequence::Leaf`]s) and an index. Each leaf
//! becomes a queue of [`Action`]s: send a command and wait for its reply, wait for a
//! confirmed state (with a hold time and a timeout), sleep, an IV scan. While a run is
//! going every message and tick checks the run's conditions (interlock OK and recent,
//! LV permit while LV must be on, the commanded services online, the environment
//! fresh, no refused command); any failing pauses the run:
//! - the step in progress stops (an IV scan ramps HV back to its start voltage; nothing
//!   else is sent: the interlock acts, the sequencer does not fight it);
//! - once everything has been normal for `resume.hold_secs`, the state the sequence had
//!   built (cooling, LV, HV) is restored and the interrupted step runs again from its
//!   start (an IV scan from its last good point);
//! - paused longer than `resume.max_pause_minutes`, or more than `resume.max_pauses`
//!   times, the run ends as aborted, HV and then LV switched off.
//!
//! Every step start and end, pause and resume is a checkpoint ([`Effect::Checkpoint`]);
//! a restarted service gives it to [`Engine::restore`] and the run goes on at its step,
//! after the same restore of preconditions as after a pause.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use dcs_shared::line_protocol::{FieldValue, Point};
use dcs_shared::UtcNanos;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};

use crate::sequence::{self, Cooling, IvScan, Leaf, Limits, Sequence, Step, Switch};
use crate::world::World;

/// Timing and limits of the engine (`burnin.yaml`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Conditions normal this long before a paused run resumes.
    pub hold: Duration,
    /// Longest pause before the run is aborted.
    pub max_pause: Duration,
    /// Most pauses in one run.
    pub max_pauses: u32,
    /// A command not answered within this pauses the run.
    pub reply_timeout: Duration,
    /// `interlock/status` older than this counts as the interlock gone.
    pub interlock_max_age: Duration,
    /// Which of the chiller's set-points the sequencer writes (1..3).
    pub chiller_setpoint: u8,
    /// Sequence limits.
    pub limits: Limits,
}

/// What the engine asks the service to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a command (QoS 1, not retained).
    Command {
        /// Topic.
        topic: String,
        /// Payload.
        payload: String,
    },
    /// Publish `burnin/status` (retained).
    Status(Json),
    /// Write the checkpoint (None: no run in progress, remove it).
    Checkpoint(Option<Json>),
    /// A finished run's document, to be stored.
    Record(Json),
    /// A `burnin_steps` point for InfluxDB (step start and end, pause, resume, run end).
    Point(Point),
    /// A line for the log: (warn?, message).
    Log(bool, String),
}

/// A run's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunState {
    /// Running its steps.
    Running,
    /// Paused: waiting for conditions (or the operator) before resuming.
    Paused {
        /// Why.
        reason: String,
        /// Since when, UTC ns.
        since_ns: i64,
        /// Paused by an operator: only `resume` ends it.
        manual: bool,
    },
    /// Re-establishing the step's preconditions after a pause or a restart.
    Restoring,
    /// Switching HV and LV off before ending as aborted or failed.
    Ending {
        /// The end state: `aborted` or `failed`.
        end: String,
        /// Why.
        reason: String,
    },
    /// All steps done.
    Done,
    /// Stopped by an operator or a limit.
    Aborted {
        /// Why.
        reason: String,
    },
    /// A step could not be done (timeout).
    Failed {
        /// Why.
        reason: String,
    },
}

impl RunState {
    fn name(&self) -> &'static str {
        match self {
            RunState::Running | RunState::Restoring | RunState::Ending { .. } => "running",
            RunState::Paused { .. } => "paused",
            RunState::Done => "done",
            RunState::Aborted { .. } => "aborted",
            RunState::Failed { .. } => "failed",
        }
    }
    fn finished(&self) -> bool {
        matches!(
            self,
            RunState::Done | RunState::Aborted { .. } | RunState::Failed { .. }
        )
    }
}

/// The state the sequence has built so far: what a resume restores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    /// The last cooling step.
    pub cooling: Option<Cooling>,
    /// LV on per channel.
    pub lv: BTreeMap<String, bool>,
    /// HV on per channel.
    pub hv: BTreeMap<String, bool>,
    /// HV set-point per channel, volts.
    pub hv_set: BTreeMap<String, f64>,
    /// LV set-point per channel, volts.
    pub lv_set: BTreeMap<String, f64>,
}

/// A step as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Index in the flattened sequence.
    pub index: usize,
    /// Path.
    pub path: String,
    /// Kind.
    pub kind: String,
    /// Start, UTC ns (the last attempt's, when a pause made it run again).
    pub start_ns: i64,
    /// End, UTC ns.
    pub end_ns: Option<i64>,
    /// `done`, `interrupted` (a pause), `failed`, `aborted`.
    pub outcome: String,
    /// Conditions at the start.
    pub start: Json,
    /// Conditions at the end.
    pub end: Option<Json>,
    /// IV curves by channel (iv_scan), Ph2_ACF run (calibration), notes.
    #[serde(default, skip_serializing_if = "Json::is_null")]
    pub data: Json,
}

/// A pause as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseRecord {
    /// Why.
    pub reason: String,
    /// The step it interrupted.
    pub step: String,
    /// Start, UTC ns.
    pub start_ns: i64,
    /// End, UTC ns (None while paused).
    pub end_ns: Option<i64>,
}

/// One IV point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IvPoint {
    /// UTC ns of the reading.
    pub t_ns: i64,
    /// Set, volts.
    pub v_set: f64,
    /// Measured, volts.
    pub v: Option<f64>,
    /// Measured, microamps.
    pub i_ua: Option<f64>,
    /// The conditions at that instant.
    pub env: Json,
}

/// The IV scan of one channel, kept in the checkpoint so a redo goes on from its last
/// good point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IvCurve {
    /// Points taken.
    pub points: Vec<IvPoint>,
    /// `scanning`, `complete`, `compliance`.
    pub end: String,
}

/// A run: what the checkpoint holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Run id (`BI-20261207T101502Z`).
    pub id: String,
    /// Sequence name (file stem).
    pub sequence: String,
    /// The sequence's text as started.
    pub text: String,
    /// Who started it.
    pub operator: String,
    /// Why.
    pub comment: String,
    /// Modules under test.
    pub modules: Vec<String>,
    /// Their CAEN channels.
    pub channels: Vec<String>,
    /// UTC ns.
    pub start_ns: i64,
    /// UTC ns, once finished.
    pub end_ns: Option<i64>,
    /// The current step (== total when all done).
    pub index: usize,
    /// Number of steps.
    pub total: usize,
    /// State.
    pub state: RunState,
    /// What a resume restores.
    pub desired: Desired,
    /// Every step started.
    pub steps: Vec<StepRecord>,
    /// Every pause.
    pub pauses: Vec<PauseRecord>,
    /// IV curves of the scan in progress, by channel.
    #[serde(default)]
    pub iv: BTreeMap<String, IvCurve>,
}

/// What the engine is doing now.
#[derive(Debug)]
enum Action {
    /// Send, then wait for the reply to that topic.
    Send { topic: String, payload: String },
    /// Wait for a condition to hold for `hold`, fail after `timeout`.
    Wait {
        cond: Cond,
        hold: Duration,
        timeout: Duration,
    },
    /// A timed wait.
    Sleep(Duration),
    /// The IV scan.
    Iv(IvScan),
    /// A Ph2_ACF run.
    Calibration(sequence::Calibration),
}

#[derive(Debug, Clone)]
enum Cond {
    ChillerAt { temp: f64, tol: f64 },
    Lv { channels: Vec<String>, on: bool },
    Hv { channels: Vec<String>, on: bool },
    Require(sequence::Require),
}

#[derive(Debug)]
struct Exec {
    actions: VecDeque<Action>,
    /// The front action's start, and since when its condition holds.
    since: Instant,
    holding: Option<Instant>,
    /// Commands sent and not yet answered: topic -> sent at.
    awaiting: BTreeMap<String, Instant>,
    sent_front: bool,
    iv: Option<IvExec>,
    calibration: Option<CalExec>,
}

#[derive(Debug)]
struct IvExec {
    /// Per channel: points to do, position, phase.
    chans: BTreeMap<String, IvChan>,
}

#[derive(Debug)]
struct IvChan {
    targets: Vec<f64>,
    next: usize,
    phase: IvPhase,
    since: Instant,
    /// VMon when the current move began: how far the ramp has to go.
    start_v: f64,
}

#[derive(Debug, PartialEq)]
enum IvPhase {
    /// Not yet sent its next point.
    Start,
    /// Set-point sent, waiting for VMon to reach it.
    Moving(f64),
    /// Reached; reading once settled.
    Settling(f64),
    /// Going back to the start voltage.
    Returning,
    Finished,
}

/// Why an IV scan cannot go on.
enum IvErr {
    /// Conditions may come back (a trip, a slow ramp): pause.
    Pause(String),
    /// The sequence itself is wrong: fail the run.
    Fail(String),
}

#[derive(Debug)]
struct CalExec {
    /// The bridge's last finished run when ours was asked for: ours is the next one.
    before: Option<String>,
}

/// The sequencer.
pub struct Engine {
    settings: Settings,
    /// What is seen of the lab.
    pub world: World,
    run: Option<Run>,
    leaves: Vec<Leaf>,
    exec: Option<Exec>,
    /// When conditions became normal during a pause.
    normal_since: Option<Instant>,
    /// The problem seen last (for the log on change).
    name: String,
}

/// An operator's command.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Start a run of `sequence` (already loaded by the service).
    Start {
        /// Name.
        name: String,
        /// Parsed.
        sequence: Box<Sequence>,
        /// Text.
        text: String,
        /// Modules.
        modules: Vec<String>,
        /// Who.
        operator: String,
        /// Why.
        comment: String,
    },
    /// Pause.
    Pause {
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
    /// Resume a paused run.
    Resume {
        /// Who.
        operator: String,
    },
    /// Abort.
    Abort {
        /// Who.
        operator: String,
        /// Why.
        reason: String,
    },
}

const VOLT_TOL_MIN: f64 = 1.0;

/// How long an ending run waits for HV (then LV) to be confirmed off.
const ENDING_WAIT: Duration = Duration::from_secs(180);

fn volt_tol(v: f64) -> f64 {
    (v.abs() * 0.01).max(VOLT_TOL_MIN)
}

impl Engine {
    /// A sequencer with nothing running; `name` is its topic prefix.
    pub fn new(name: &str, settings: Settings, world: World) -> Self {
        Engine {
            settings,
            world,
            run: None,
            leaves: Vec::new(),
            exec: None,
            normal_since: None,
            name: name.to_string(),
        }
    }

    /// The run, if any (finished ones stay until the next start).
    pub fn run(&self) -> Option<&Run> {
        self.run.as_ref()
    }

    /// The state word for replies.
    pub fn state(&self) -> &'static str {
        self.run.as_ref().map_or("idle", |r| r.state.name())
    }

    /// Takes back a checkpointed run after a restart: paused until conditions are
    /// normal, then its preconditions are restored and its step runs again.
    pub fn restore(&mut self, mut run: Run, now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let seq = match sequence::parse(
            &run.text,
            std::path::Path::new(&run.sequence),
            self.settings.limits,
        ) {
            Ok(s) => s,
            Err(e) if run.state.finished() => {
                return vec![Effect::Log(
                    true,
                    format!(
                        "last run {} not shown: its sequence no longer loads: {e}",
                        run.id
                    ),
                )]
            }
            Err(e) => {
                // Its supplies may be on: take it over and end it, never drop it.
                self.leaves = Vec::new();
                self.run = Some(run);
                return self.end_safely(
                    "failed",
                    format!("not resumed after a restart: its sequence no longer loads ({e})"),
                    now,
                    wall,
                );
            }
        };
        self.leaves = seq.flatten();
        let mut out = vec![Effect::Log(
            false,
            format!(
                "run {} restored from its checkpoint at {}",
                run.id, run.index
            ),
        )];
        if run.state.finished() {
            self.run = Some(run);
            out.push(self.status(wall));
            return out;
        }
        if let RunState::Ending { end, reason } = run.state.clone() {
            // Killed while switching off after an abort or a failure: finish that, never
            // resume what the operator or a limit ended.
            self.run = Some(run);
            out.extend(self.end_safely(&end, reason, now, wall));
            return out;
        }
        if let Some(s) = run.steps.last_mut() {
            if s.end_ns.is_none() {
                s.outcome = "interrupted".into();
                s.end_ns = Some(wall.as_nanos());
            }
        }
        // A run that was paused stays paused (its pause goes on); any other is paused now.
        let newly_paused = !matches!(run.state, RunState::Paused { .. });
        if newly_paused {
            run.pauses.push(PauseRecord {
                reason: "burnin restarted".into(),
                step: self.path(run.index),
                start_ns: wall.as_nanos(),
                end_ns: None,
            });
            run.state = RunState::Paused {
                reason: "burnin restarted: resuming once conditions are normal".into(),
                since_ns: wall.as_nanos(),
                manual: false,
            };
        }
        self.run = Some(run);
        self.exec = None;
        out.push(self.checkpoint());
        if newly_paused {
            out.push(self.mark("pause", Some("burnin restarted"), wall));
        }
        out.push(self.status(wall));
        out
    }

    fn path(&self, i: usize) -> String {
        self.leaves
            .get(i)
            .map_or_else(|| "end".into(), |l| l.path.clone())
    }

    /// An operator's command: the reply's outcome and what to do.
    pub fn request(
        &mut self,
        req: Request,
        now: Instant,
        wall: UtcNanos,
    ) -> (Result<(), String>, Vec<Effect>) {
        match req {
            Request::Start {
                name,
                sequence,
                text,
                modules,
                operator,
                comment,
            } => self.start(name, *sequence, text, modules, operator, comment, now, wall),
            Request::Pause {
                operator,
                reason: why,
            } => {
                let Some(run) = self.run.as_mut().filter(|r| !r.state.finished()) else {
                    return (Err("no run in progress".into()), vec![]);
                };
                match &mut run.state {
                    RunState::Ending { .. } => {
                        return (Err("the run is already ending".into()), vec![]);
                    }
                    // Paused by itself: the operator's hold makes it wait for `resume`
                    // (the box may be open), not only for conditions.
                    RunState::Paused { manual, reason, .. } => {
                        if *manual {
                            return (Err(format!("the run is already paused: {reason}")), vec![]);
                        }
                        *manual = true;
                        reason.push_str(&format!("; held by {operator}: {why}"));
                        self.normal_since = None;
                        return (Ok(()), vec![self.checkpoint(), self.status(wall)]);
                    }
                    _ => {}
                }
                let why = format!("paused by {operator}: {why}");
                (Ok(()), self.pause(why, true, now, wall))
            }
            Request::Resume { operator } => {
                let Some(run) = self.run.as_mut() else {
                    return (Err("no run in progress".into()), vec![]);
                };
                let RunState::Paused { manual, .. } = &mut run.state else {
                    return (
                        Err(format!("the run is {}, not paused", run.state.name())),
                        vec![],
                    );
                };
                // The operator lifts their own pause; conditions must still be normal
                // for the hold time, as after any pause.
                *manual = false;
                self.normal_since = None;
                let out = vec![
                    Effect::Log(false, format!("resume asked by {operator}")),
                    self.checkpoint(),
                    self.status(wall),
                ];
                (Ok(()), out)
            }
            Request::Abort { operator, reason } => {
                let Some(run) = self.run.as_ref().filter(|r| !r.state.finished()) else {
                    return (Err("no run in progress".into()), vec![]);
                };
                if matches!(run.state, RunState::Ending { .. }) {
                    return (Err("the run is already ending".into()), vec![]);
                }
                let out = self.end_safely(
                    "aborted",
                    format!("aborted by {operator}: {reason}"),
                    now,
                    wall,
                );
                (Ok(()), out)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        name: String,
        sequence: Sequence,
        text: String,
        modules: Vec<String>,
        operator: String,
        comment: String,
        now: Instant,
        wall: UtcNanos,
    ) -> (Result<(), String>, Vec<Effect>) {
        if let Some(r) = self.run.as_ref().filter(|r| !r.state.finished()) {
            return (
                Err(format!(
                    "run {} is {} ({}): abort it first",
                    r.id,
                    r.state.name(),
                    self.path(r.index)
                )),
                vec![],
            );
        }
        if let Some(why) = self.problem(now, false) {
            return (Err(format!("not started: {why}")), vec![]);
        }
        let known = self.world.modules();
        if let Some(m) = modules.iter().find(|m| !known.contains(m)) {
            return (
                Err(format!(
                    "no CAEN channel has module `{m}` (modules: {})",
                    known.join(", ")
                )),
                vec![],
            );
        }
        let channels = self.world.channels_of(&modules);
        let leaves = sequence.flatten();
        for l in &leaves {
            let chans = match &l.step {
                Step::Lv(p) | Step::Hv(p) => p.channels.as_ref(),
                Step::IvScan(v) => v.channels.as_ref(),
                _ => None,
            };
            if let Some(c) = chans.and_then(|c| c.iter().find(|c| !channels.contains(c))) {
                return (
                    Err(format!(
                        "{}: channel `{c}` is not a channel of modules {} ({})",
                        l.path,
                        modules.join(", "),
                        channels.join(", ")
                    )),
                    vec![],
                );
            }
        }
        let id = format!("BI-{}", dcs_shared::time::run_id(wall));
        self.leaves = leaves;
        self.run = Some(Run {
            id: id.clone(),
            sequence: name.clone(),
            text,
            operator: operator.clone(),
            comment,
            modules,
            channels,
            start_ns: wall.as_nanos(),
            end_ns: None,
            index: 0,
            total: self.leaves.len(),
            state: RunState::Running,
            desired: Desired::default(),
            steps: Vec::new(),
            pauses: Vec::new(),
            iv: BTreeMap::new(),
        });
        let mut out = vec![Effect::Log(
            false,
            format!(
                "run {id} of `{name}` started by {operator} ({} steps)",
                self.leaves.len()
            ),
        )];
        out.extend(self.begin_step(now, wall));
        (Ok(()), out)
    }

    /// A reply from a commanded service.
    fn on_reply(&mut self, payload: &[u8], now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let Ok(reply) = serde_json::from_slice::<dcs_shared::Reply>(payload) else {
            return vec![];
        };
        let Some(exec) = self.exec.as_mut() else {
            return vec![];
        };
        if exec.awaiting.remove(&reply.topic).is_none() {
            return vec![];
        }
        if reply.ok {
            // Through the conditions first: the next command may be one they forbid now.
            return self.tick(now, wall);
        }
        let why = format!(
            "`{}` refused: {}",
            reply.topic,
            reply.error.unwrap_or_default()
        );
        if matches!(
            self.run.as_ref().map(|r| &r.state),
            Some(RunState::Ending { .. })
        ) {
            return vec![Effect::Log(true, format!("while ending the run: {why}"))];
        }
        self.pause(why, false, now, wall)
    }

    /// Takes a message.
    pub fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        wall: UtcNanos,
    ) -> Vec<Effect> {
        if topic.ends_with("/reply") && !topic.starts_with(&format!("{}/", self.name)) {
            return self.on_reply(payload, now, wall);
        }
        self.world.ingest(topic, payload, now, wall);
        self.tick(now, wall)
    }

    /// The clock.
    pub fn tick(&mut self, now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let Some(run) = self.run.as_ref() else {
            return vec![];
        };
        match run.state.clone() {
            RunState::Running | RunState::Restoring => {
                let needs_lv = self.needs_lv();
                if let Some(why) = self.problem(now, needs_lv) {
                    return self.pause(why, false, now, wall);
                }
                self.advance(now, wall)
            }
            RunState::Ending { .. } => self.advance(now, wall),
            RunState::Paused {
                since_ns, manual, ..
            } => {
                let paused_for = Duration::from_nanos(
                    u64::try_from(wall.as_nanos().saturating_sub(since_ns)).unwrap_or(0),
                );
                if paused_for > self.settings.max_pause {
                    return self.end_safely(
                        "aborted",
                        format!(
                            "paused for {} min, longer than resume.max_pause_minutes",
                            paused_for.as_secs() / 60
                        ),
                        now,
                        wall,
                    );
                }
                let needs_lv = self.needs_lv();
                if manual || self.problem(now, needs_lv).is_some() {
                    self.normal_since = None;
                    return vec![];
                }
                let since = *self.normal_since.get_or_insert(now);
                if now.saturating_duration_since(since) < self.settings.hold {
                    return vec![];
                }
                self.normal_since = None;
                self.begin_restore(now, wall)
            }
            _ => vec![],
        }
    }

    /// Whether LV is on by the sequence, or the current step switches it on: then the
    /// interlock's permit is a condition (the sequencer never asks for LV without it).
    fn needs_lv(&self) -> bool {
        let Some(run) = &self.run else { return false };
        run.desired.lv.values().any(|&on| on)
            || matches!(
                self.leaves.get(run.index).map(|l| &l.step),
                Some(Step::Lv(p)) if p.switch == Some(Switch::On)
            )
    }

    /// Why the run cannot go on now, if anything.
    fn problem(&self, now: Instant, needs_lv: bool) -> Option<String> {
        let n = self.world.names();
        for s in [&n.interlock, &n.caen, &n.chiller] {
            if self.world.offline(s) {
                return Some(format!("{s} is offline"));
            }
        }
        match &self.world.interlock {
            None => return Some(format!("no status from {} yet", n.interlock)),
            Some((s, _)) if s != "OK" => {
                return Some(format!("interlock {s}"));
            }
            _ => {}
        }
        if self
            .world
            .interlock_age(now)
            .is_some_and(|a| a > self.settings.interlock_max_age)
        {
            return Some(format!("{}/status is stale", n.interlock));
        }
        if needs_lv && self.world.lv_permit != Some(true) {
            return Some("the interlock's LV permit is withdrawn".into());
        }
        self.world.env_problem(now)
    }

    fn pause(&mut self, reason: String, manual: bool, now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let mut out = vec![Effect::Log(!manual, format!("run paused: {reason}"))];
        let path = self.path(self.run.as_ref().map_or(0, |r| r.index));
        // An IV scan in progress ramps back to its start: the only command a pause sends.
        if let Some(iv) = self.exec.as_ref().and_then(|e| {
            e.actions.front().and_then(|a| match a {
                Action::Iv(v) => Some(v.clone()),
                _ => None,
            })
        }) {
            if let Some(run) = &self.run {
                for ch in iv.channels.clone().unwrap_or_else(|| run.channels.clone()) {
                    out.push(self.setv_hv(&ch, iv.from));
                }
            }
        }
        out.extend(self.stop_calibration());
        self.exec = None;
        self.normal_since = None;
        let snap_env = self.world.snapshot(
            &self
                .run
                .as_ref()
                .map(|r| r.channels.clone())
                .unwrap_or_default(),
            now,
        );
        let Some(run) = self.run.as_mut() else {
            return out;
        };
        if let Some(s) = run.steps.last_mut().filter(|s| s.end_ns.is_none()) {
            s.outcome = "interrupted".into();
            s.end_ns = Some(wall.as_nanos());
            s.end = Some(snap_env);
        }
        run.pauses.push(PauseRecord {
            reason: reason.clone(),
            step: path,
            start_ns: wall.as_nanos(),
            end_ns: None,
        });
        run.state = RunState::Paused {
            reason: reason.clone(),
            since_ns: wall.as_nanos(),
            manual,
        };
        // Said first: the checkpoint (the whole run, IV curves included) takes an fsync,
        // and a crash before it is written restarts into a pause all the same.
        out.push(self.status(wall));
        out.push(self.mark("pause", Some(&reason), wall));
        let Some(run) = self.run.as_mut() else {
            return out;
        };
        let automatic = run
            .pauses
            .iter()
            .filter(|p| !p.reason.starts_with("paused by"))
            .count();
        if automatic as u64 > u64::from(self.settings.max_pauses) {
            out.extend(self.end_safely(
                "aborted",
                format!("{automatic} pauses, more than resume.max_pauses"),
                now,
                wall,
            ));
            return out;
        }
        out.push(self.checkpoint());
        out
    }

    fn begin_restore(&mut self, now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let Some(run) = self.run.as_mut() else {
            return vec![];
        };
        if let Some(p) = run.pauses.last_mut().filter(|p| p.end_ns.is_none()) {
            p.end_ns = Some(wall.as_nanos());
        }
        run.state = RunState::Restoring;
        let d = run.desired.clone();
        let mut actions = VecDeque::new();
        if let Some(c) = &d.cooling {
            actions.extend(self.cooling_actions(c));
        }
        let lv_on: Vec<String> =
            d.lv.iter()
                .filter(|(_, &on)| on)
                .map(|(c, _)| c.clone())
                .collect();
        for (ch, v) in &d.lv_set {
            actions.push_back(self.send(&format!("setv/lv/{ch}"), show(*v)));
        }
        // Only what is not on already: an `on` to a channel that is on is no change,
        // and its reply would come before any new status, so the wait would pass on it.
        let is_on = |ch: &String, lv: bool| {
            self.world.channels.get(ch).is_some_and(|c| {
                if lv {
                    c.lv_on == Some(true) && !c.lv_ramping
                } else {
                    c.hv_on == Some(true) && !c.hv_ramping
                }
            })
        };
        for ch in lv_on.iter().filter(|c| !is_on(c, true)) {
            actions.push_back(self.send(&format!("switch/lv/{ch}"), "on".into()));
        }
        if !lv_on.is_empty() {
            actions.push_back(Action::Wait {
                cond: Cond::Lv {
                    channels: lv_on,
                    on: true,
                },
                hold: Duration::ZERO,
                timeout: Duration::from_secs(300),
            });
        }
        for (ch, v) in &d.hv_set {
            actions.push_back(self.send(&format!("setv/hv/{ch}"), show(*v)));
        }
        let hv_on: Vec<String> =
            d.hv.iter()
                .filter(|(_, &on)| on)
                .map(|(c, _)| c.clone())
                .collect();
        for ch in hv_on.iter().filter(|c| !is_on(c, false)) {
            actions.push_back(self.send(&format!("switch/hv/{ch}"), "on".into()));
        }
        if !hv_on.is_empty() {
            actions.push_back(Action::Wait {
                cond: Cond::Hv {
                    channels: hv_on,
                    on: true,
                },
                hold: Duration::ZERO,
                timeout: Duration::from_secs(600),
            });
        }
        self.exec = Some(Exec::new(actions, now));
        let mut out = vec![
            Effect::Log(
                false,
                "conditions normal: restoring the step's preconditions".into(),
            ),
            self.mark("resume", None, wall),
        ];
        out.push(self.checkpoint());
        out.extend(self.tick(now, wall));
        out.push(self.status(wall));
        out
    }

    fn end_safely(
        &mut self,
        end: &str,
        reason: String,
        now: Instant,
        wall: UtcNanos,
    ) -> Vec<Effect> {
        let Some(run) = self.run.as_mut() else {
            return vec![];
        };
        if let Some(s) = run.steps.last_mut().filter(|s| s.end_ns.is_none()) {
            s.outcome = end.to_string();
            s.end_ns = Some(wall.as_nanos());
        }
        if let Some(p) = run.pauses.last_mut().filter(|p| p.end_ns.is_none()) {
            p.end_ns = Some(wall.as_nanos());
        }
        run.state = RunState::Ending {
            end: end.to_string(),
            reason: reason.clone(),
        };
        let chans = run.channels.clone();
        let stop = self.stop_calibration();
        let mut actions = VecDeque::new();
        for ch in &chans {
            actions.push_back(self.send(&format!("switch/hv/{ch}"), "off".into()));
        }
        // Confirmed off, HV before LV; a switch-off that is not confirmed is said in
        // the run's reason (it never ends as if the lab were safe).
        actions.push_back(Action::Wait {
            cond: Cond::Hv {
                channels: chans.clone(),
                on: false,
            },
            hold: Duration::ZERO,
            timeout: ENDING_WAIT,
        });
        for ch in &chans {
            actions.push_back(self.send(&format!("switch/lv/{ch}"), "off".into()));
        }
        actions.push_back(Action::Wait {
            cond: Cond::Lv {
                channels: chans,
                on: false,
            },
            hold: Duration::ZERO,
            timeout: ENDING_WAIT,
        });
        self.exec = Some(Exec::new(actions, now));
        // On disk before the first off goes out: a restart must end it, never resume it.
        let mut out = vec![
            Effect::Log(true, format!("run ending ({end}): {reason}; HV and LV off")),
            self.checkpoint(),
        ];
        out.extend(stop);
        out.extend(self.advance(now, wall));
        out.push(self.status(wall));
        out
    }

    /// A Ph2_ACF run this run asked for and did not see end: stopped (the bridge records
    /// it as `stopped`), so a pause or an end never leaves a calibration running on
    /// modules whose LV may go off.
    fn stop_calibration(&self) -> Vec<Effect> {
        let asked = self.exec.as_ref().is_some_and(|e| {
            e.calibration.is_some() && matches!(e.actions.front(), Some(Action::Calibration(_)))
        });
        if !asked {
            return vec![];
        }
        vec![Effect::Command {
            topic: format!("{}/cmd/stop", self.world.names().ph2acf),
            payload: String::new(),
        }]
    }

    fn send(&self, cmd: &str, payload: String) -> Action {
        Action::Send {
            topic: format!("{}/cmd/{cmd}", self.world.names().caen),
            payload,
        }
    }

    fn setv_hv(&self, ch: &str, v: f64) -> Effect {
        Effect::Command {
            topic: format!("{}/cmd/setv/hv/{ch}", self.world.names().caen),
            payload: show(v),
        }
    }

    fn cooling_actions(&self, c: &Cooling) -> Vec<Action> {
        let chiller = &self.world.names().chiller;
        vec![
            Action::Send {
                topic: format!("{chiller}/cmd/setWT"),
                payload: json!({"setpoint": self.settings.chiller_setpoint, "temp": c.temp})
                    .to_string(),
            },
            // The set-point written is the one in use (a unit left on another one
            // would never move).
            Action::Send {
                topic: format!("{chiller}/cmd/useSP"),
                payload: json!({"setpoint": self.settings.chiller_setpoint}).to_string(),
            },
            Action::Send {
                topic: format!("{chiller}/cmd/start"),
                payload: String::new(),
            },
            Action::Wait {
                cond: Cond::ChillerAt {
                    temp: c.temp,
                    tol: c.tolerance,
                },
                hold: secs(c.hold_secs),
                timeout: secs(c.timeout_secs),
            },
        ]
    }

    fn actions_of(&self, leaf: &Leaf, run: &Run) -> VecDeque<Action> {
        let chans = |c: &Option<Vec<String>>| c.clone().unwrap_or_else(|| run.channels.clone());
        let mut a = VecDeque::new();
        match &leaf.step {
            Step::Cooling(c) => a.extend(self.cooling_actions(c)),
            Step::Require(r) => a.push_back(Action::Wait {
                cond: Cond::Require(r.clone()),
                hold: Duration::ZERO,
                timeout: secs(r.timeout_secs),
            }),
            Step::Lv(p) | Step::Hv(p) => {
                let kind = leaf.step.kind();
                let chs = chans(&p.channels);
                if let Some(v) = p.set {
                    for ch in &chs {
                        a.push_back(self.send(&format!("setv/{kind}/{ch}"), show(v)));
                    }
                }
                if let Some(sw) = p.switch {
                    let on = sw == Switch::On;
                    for ch in &chs {
                        a.push_back(self.send(
                            &format!("switch/{kind}/{ch}"),
                            if on { "on" } else { "off" }.into(),
                        ));
                    }
                    let cond = if kind == "lv" {
                        Cond::Lv {
                            channels: chs.clone(),
                            on,
                        }
                    } else {
                        Cond::Hv {
                            channels: chs.clone(),
                            on,
                        }
                    };
                    a.push_back(Action::Wait {
                        cond,
                        hold: Duration::ZERO,
                        timeout: secs(p.timeout_secs),
                    });
                }
            }
            Step::Soak(s) => a.push_back(Action::Sleep(secs(s.secs))),
            Step::IvScan(v) => a.push_back(Action::Iv(v.clone())),
            Step::Calibration(c) => a.push_back(Action::Calibration(c.clone())),
            Step::Repeat(_) => {}
        }
        a
    }

    fn begin_step(&mut self, now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let Some(run) = self.run.as_ref() else {
            return vec![];
        };
        if run.index >= self.leaves.len() {
            return self.finish(wall);
        }
        let leaf = self.leaves[run.index].clone();
        let actions = self.actions_of(&leaf, run);
        let snap = self.world.snapshot(&run.channels, now);
        let run = self.run.as_mut().expect("checked above");
        run.state = RunState::Running;
        if !matches!(leaf.step, Step::IvScan(_)) {
            run.iv.clear();
        }
        run.steps.push(StepRecord {
            index: run.index,
            path: leaf.path.clone(),
            kind: leaf.step.kind().into(),
            start_ns: wall.as_nanos(),
            end_ns: None,
            outcome: "running".into(),
            start: snap,
            end: None,
            data: Json::Null,
        });
        self.exec = Some(Exec::new(actions, now));
        let mut out = vec![
            Effect::Log(false, format!("step {}", leaf.path)),
            self.checkpoint(),
            self.mark("step_start", None, wall),
        ];
        // The conditions as this step needs them (an LV-on step needs the permit).
        out.extend(self.tick(now, wall));
        out.push(self.status(wall));
        out
    }

    fn end_step(&mut self, now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let snap = self.world.snapshot(
            &self
                .run
                .as_ref()
                .map(|r| r.channels.clone())
                .unwrap_or_default(),
            now,
        );
        let Some(run) = self.run.as_mut() else {
            return vec![];
        };
        // Past the last step (a checkpoint from a longer sequence): the run is over.
        let Some(leaf) = self.leaves.get(run.index).cloned() else {
            return self.finish(wall);
        };
        let chans = |c: &Option<Vec<String>>| c.clone().unwrap_or_else(|| run.channels.clone());
        match &leaf.step {
            Step::Cooling(c) => run.desired.cooling = Some(c.clone()),
            Step::Lv(p) => {
                for ch in chans(&p.channels) {
                    if let Some(v) = p.set {
                        run.desired.lv_set.insert(ch.clone(), v);
                    }
                    if let Some(sw) = p.switch {
                        run.desired.lv.insert(ch.clone(), sw == Switch::On);
                        if sw == Switch::Off {
                            // The CAEN FSM ramps HV down before LV goes off.
                            run.desired.hv.insert(ch, false);
                        }
                    }
                }
            }
            Step::Hv(p) => {
                for ch in chans(&p.channels) {
                    if let Some(v) = p.set {
                        run.desired.hv_set.insert(ch.clone(), v);
                    }
                    if let Some(sw) = p.switch {
                        run.desired.hv.insert(ch, sw == Switch::On);
                    }
                }
            }
            Step::IvScan(v) => {
                for ch in chans(&v.channels) {
                    run.desired.hv_set.insert(ch, v.from);
                }
            }
            _ => {}
        }
        let iv = std::mem::take(&mut run.iv);
        if let Some(s) = run.steps.last_mut() {
            s.end_ns = Some(wall.as_nanos());
            s.outcome = "done".into();
            s.end = Some(snap);
            if !iv.is_empty() {
                s.data = json!({"iv": iv});
            }
        }
        let mut out = vec![self.mark("step_end", None, wall)];
        if let Some(run) = self.run.as_mut() {
            run.index += 1;
        }
        self.exec = None;
        out.extend(self.begin_step(now, wall));
        out
    }

    fn finish(&mut self, wall: UtcNanos) -> Vec<Effect> {
        let Some(run) = self.run.as_mut() else {
            return vec![];
        };
        run.state = RunState::Done;
        run.end_ns = Some(wall.as_nanos());
        self.exec = None;
        let record = serde_json::to_value(&*run).unwrap_or(Json::Null);
        vec![
            Effect::Log(false, format!("run {} done", run.id)),
            Effect::Record(record),
            self.checkpoint(),
            self.mark("run_end", None, wall),
            self.status(wall),
        ]
    }

    /// Works the front action as far as it goes.
    fn advance(&mut self, now: Instant, wall: UtcNanos) -> Vec<Effect> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let Some(exec) = self.exec.as_mut() else {
                return out;
            };
            if let Some((topic, at)) = exec.awaiting.iter().next() {
                if now.saturating_duration_since(*at) > self.settings.reply_timeout {
                    let why = format!(
                        "no reply to `{topic}` within {} s",
                        self.settings.reply_timeout.as_secs()
                    );
                    if matches!(
                        self.run.as_ref().map(|r| &r.state),
                        Some(RunState::Ending { .. })
                    ) {
                        exec.awaiting.clear();
                        out.push(Effect::Log(true, why));
                        continue;
                    }
                    out.extend(self.pause(why, false, now, wall));
                    return out;
                }
                // IV scans send while others are outstanding; everything else waits.
                if !matches!(exec.actions.front(), Some(Action::Iv(_))) {
                    return out;
                }
            }
            let Some(action) = exec.actions.front() else {
                // All actions done.
                self.exec = None;
                let state = self.run.as_ref().map(|r| r.state.clone());
                match state {
                    Some(RunState::Restoring) => {
                        out.push(Effect::Log(
                            false,
                            "preconditions restored: the step runs again".into(),
                        ));
                        out.extend(self.begin_step(now, wall));
                    }
                    Some(RunState::Ending { end, reason }) => {
                        out.extend(self.ended(&end, reason, wall))
                    }
                    Some(RunState::Running) => out.extend(self.end_step(now, wall)),
                    _ => {}
                }
                return out;
            };
            match action {
                Action::Send { topic, payload } => {
                    if exec.sent_front {
                        // Answered (awaiting is empty).
                        exec.pop(now);
                        continue;
                    }
                    let (topic, payload) = (topic.clone(), payload.clone());
                    if let Some(why) = self.hv_on_refused(&topic, &payload) {
                        return match why {
                            Err(never) => {
                                out.extend(self.end_safely("failed", never, now, wall));
                                out
                            }
                            Ok(not_now) => {
                                out.extend(self.pause(not_now, false, now, wall));
                                out
                            }
                        };
                    }
                    let exec = self.exec.as_mut().expect("checked above");
                    out.push(Effect::Command {
                        topic: topic.clone(),
                        payload: payload.clone(),
                    });
                    let t = topic.clone();
                    exec.awaiting.insert(t, now);
                    exec.sent_front = true;
                    return out;
                }
                Action::Sleep(d) => {
                    if now.saturating_duration_since(exec.since) >= *d {
                        exec.pop(now);
                        continue;
                    }
                    return out;
                }
                Action::Wait {
                    cond,
                    hold,
                    timeout,
                } => {
                    let (cond, hold, timeout) = (cond.clone(), *hold, *timeout);
                    let (ok, why) = self.holds(&cond, now);
                    let exec = self.exec.as_mut().expect("checked above");
                    if ok {
                        let since = *exec.holding.get_or_insert(now);
                        if now.saturating_duration_since(since) >= hold {
                            exec.pop(now);
                            continue;
                        }
                    } else {
                        exec.holding = None;
                    }
                    if now.saturating_duration_since(exec.since) > timeout {
                        if let Some(RunState::Ending { reason, .. }) =
                            self.run.as_mut().map(|r| &mut r.state)
                        {
                            reason.push_str(&format!(" (switch-off not confirmed: {why})"));
                            out.push(Effect::Log(
                                true,
                                format!(
                                    "switch-off not confirmed in {} s: {why}",
                                    timeout.as_secs()
                                ),
                            ));
                            if let Some(e) = self.exec.as_mut() {
                                e.pop(now);
                            }
                            continue;
                        }
                        let end = if matches!(
                            self.run.as_ref().map(|r| &r.state),
                            Some(RunState::Restoring)
                        ) {
                            "aborted"
                        } else {
                            "failed"
                        };
                        out.extend(self.end_safely(
                            end,
                            format!("timed out after {} s waiting: {why}", timeout.as_secs()),
                            now,
                            wall,
                        ));
                        return out;
                    }
                    return out;
                }
                Action::Iv(v) => {
                    let v = v.clone();
                    match self.iv_step(&v, now, wall, &mut out) {
                        Ok(true) => {
                            if let Some(e) = self.exec.as_mut() {
                                e.pop(now);
                            }
                            continue;
                        }
                        Ok(false) => return out,
                        Err(IvErr::Pause(why)) => {
                            out.extend(self.pause(why, false, now, wall));
                            return out;
                        }
                        Err(IvErr::Fail(why)) => {
                            out.extend(self.end_safely("failed", why, now, wall));
                            return out;
                        }
                    }
                }
                Action::Calibration(c) => {
                    let c = c.clone();
                    match self.calibration_step(&c, now, &mut out) {
                        Ok(true) => {
                            if let Some(e) = self.exec.as_mut() {
                                e.pop(now);
                            }
                            continue;
                        }
                        Ok(false) => return out,
                        Err(why) => {
                            out.extend(self.end_safely("failed", why, now, wall));
                            return out;
                        }
                    }
                }
            }
        }
        out
    }

    fn ended(&mut self, end: &str, reason: String, wall: UtcNanos) -> Vec<Effect> {
        let Some(run) = self.run.as_mut() else {
            return vec![];
        };
        run.state = if end == "failed" {
            RunState::Failed { reason }
        } else {
            RunState::Aborted { reason }
        };
        run.end_ns = Some(wall.as_nanos());
        let record = serde_json::to_value(&*run).unwrap_or(Json::Null);
        let why = match &run.state {
            RunState::Failed { reason } | RunState::Aborted { reason } => reason.clone(),
            _ => String::new(),
        };
        vec![
            Effect::Log(true, format!("run {} {end}", run.id)),
            Effect::Record(record),
            self.checkpoint(),
            self.mark("run_end", Some(&why), wall),
            self.status(wall),
        ]
    }

    /// HV on for a channel whose LV is not confirmed on (off, ramping, unknown) is never
    /// sent, whatever asks for it: `Ok(why)` to pause (LV went off, e.g. a trip),
    /// `Err(why)` to fail the run (the sequence never switched that LV on).
    fn hv_on_refused(&self, topic: &str, payload: &str) -> Option<Result<String, String>> {
        let ch = topic
            .strip_prefix(&format!("{}/cmd/switch/hv/", self.world.names().caen))
            .filter(|_| payload == "on")?;
        let c = self.world.channels.get(ch);
        if c.is_some_and(|c| c.lv_on == Some(true) && !c.lv_ramping) {
            return None;
        }
        let run = self.run.as_ref()?;
        Some(if run.desired.lv.get(ch) == Some(&true) {
            Ok(format!("HV on held back: LV of channel {ch} is not on"))
        } else {
            Err(format!(
                "HV on asked for channel {ch} whose LV the sequence never switched on (add an `lv: {{switch: \"on\"}}` step before)"
            ))
        })
    }

    /// Whether `cond` holds now, and if not, why (for a timeout's message).
    fn holds(&self, cond: &Cond, now: Instant) -> (bool, String) {
        let w = &self.world;
        match cond {
            Cond::ChillerAt { temp, tol } => match w.chiller_temp {
                Some(t) if (t - temp).abs() <= *tol => (true, String::new()),
                t => (
                    false,
                    format!(
                        "coolant at {} degC, target {temp} +- {tol}",
                        t.map_or("?".into(), show)
                    ),
                ),
            },
            Cond::Lv { channels, on } | Cond::Hv { channels, on } => {
                let lv = matches!(cond, Cond::Lv { .. });
                let run = self.run.as_ref();
                for ch in channels {
                    let c = w.channels.get(ch);
                    let state = c.and_then(|c| if lv { c.lv_on } else { c.hv_on });
                    // On means on and done ramping (the CAEN FSM refuses HV on while
                    // LV still ramps up).
                    let ramping = c.is_some_and(|c| if lv { c.lv_ramping } else { c.hv_ramping });
                    if state != Some(*on) || (*on && ramping) {
                        return (
                            false,
                            format!(
                                "channel {ch} {} not {}",
                                if lv { "LV" } else { "HV" },
                                if *on { "on" } else { "off" }
                            ),
                        );
                    }
                    if !lv && *on {
                        // On and at its set-point (no longer ramping).
                        let want = run.and_then(|r| r.desired.hv_set.get(ch)).copied();
                        let c = c.expect("state known");
                        let at = match (want, c.hv_v) {
                            (Some(s), Some(v)) => (v - s).abs() <= volt_tol(s),
                            (None, _) => !c.hv_ramping,
                            _ => false,
                        };
                        if !at {
                            return (false, format!("channel {ch} HV ramping"));
                        }
                    }
                }
                (true, String::new())
            }
            Cond::Require(r) => {
                if let Some(max) = r.rh_below {
                    let rh = w.env_values("humidity", now);
                    if rh.is_empty() {
                        return (false, "no fresh humidity value".into());
                    }
                    if let Some(v) = rh.iter().find(|v| **v >= max) {
                        return (false, format!("humidity {v} % >= {max} %"));
                    }
                }
                if let Some(m) = r.dew_margin {
                    let dew = w.env_values("dew_point", now);
                    let target = self
                        .run
                        .as_ref()
                        .and_then(|r| r.desired.cooling.as_ref())
                        .map(|c| c.temp);
                    // The cooling this condition is checked for: the next one to come.
                    let next = self.run.as_ref().and_then(|r| {
                        self.leaves
                            .iter()
                            .skip(r.index)
                            .find_map(|l| match &l.step {
                                Step::Cooling(c) => Some(c.temp),
                                _ => None,
                            })
                    });
                    let coldest = [target, next, w.chiller_temp]
                        .into_iter()
                        .flatten()
                        .fold(f64::INFINITY, f64::min);
                    let Some(d) = dew.iter().copied().reduce(f64::max) else {
                        return (false, "no fresh dew point".into());
                    };
                    if !coldest.is_finite() || coldest - d < m {
                        return (
                            false,
                            format!(
                                "dew point {d} degC, coolant {} degC: margin below {m}",
                                show(coldest)
                            ),
                        );
                    }
                }
                (true, String::new())
            }
        }
    }

    /// One pass over the IV scan: `Ok(true)` when every channel is finished.
    fn iv_step(
        &mut self,
        v: &IvScan,
        now: Instant,
        wall: UtcNanos,
        out: &mut Vec<Effect>,
    ) -> Result<bool, IvErr> {
        let Some(run) = self.run.as_ref() else {
            return Ok(true);
        };
        let chans = v.channels.clone().unwrap_or_else(|| run.channels.clone());
        let targets = v.points();
        if self.exec.as_ref().is_some_and(|e| e.iv.is_none()) {
            // First pass (or a redo): each channel goes on after its last good point.
            let mut map = BTreeMap::new();
            for ch in &chans {
                let c = self.world.channels.get(ch);
                if c.and_then(|c| c.hv_on) != Some(true) {
                    let why = format!("IV scan: HV of channel {ch} is off");
                    // Off by the sequence's own doing: waiting cannot help.
                    return Err(if run.desired.hv.get(ch) == Some(&true) {
                        IvErr::Pause(why)
                    } else {
                        IvErr::Fail(format!(
                            "{why} and the sequence never switched it on (an `hv: {{switch: \"on\"}}` step before the scan)"
                        ))
                    });
                }
                let done = run.iv.get(ch).map_or(0, |c| c.points.len());
                let finished = run.iv.get(ch).is_some_and(|c| c.end != "scanning");
                map.insert(
                    ch.clone(),
                    IvChan {
                        targets: targets.clone(),
                        // A finished channel only goes back to the start voltage.
                        next: if finished { targets.len() } else { done },
                        phase: IvPhase::Start,
                        since: now,
                        start_v: c.and_then(|c| c.hv_v).unwrap_or(v.from),
                    },
                );
            }
            let run = self.run.as_mut().expect("checked");
            for ch in &chans {
                run.iv.entry(ch.clone()).or_insert_with(|| IvCurve {
                    points: vec![],
                    end: "scanning".into(),
                });
            }
            self.exec.as_mut().expect("checked").iv = Some(IvExec { chans: map });
        }
        let snap_chans = chans.clone();
        let mut all_done = true;
        let ids: Vec<String> = self
            .exec
            .as_ref()
            .and_then(|e| e.iv.as_ref())
            .map(|i| i.chans.keys().cloned().collect())
            .unwrap_or_default();
        for ch in ids {
            let (vmon, imon) = self
                .world
                .channels
                .get(&ch)
                .map_or((None, None), |c| (c.hv_v, c.hv_i));
            let exec = self.exec.as_mut().expect("checked");
            let c = exec
                .iv
                .as_mut()
                .expect("set")
                .chans
                .get_mut(&ch)
                .expect("listed");
            match c.phase {
                IvPhase::Finished => continue,
                IvPhase::Start => {
                    let topic = format!("{}/cmd/setv/hv/{ch}", self.world.names().caen);
                    let t = c.targets.get(c.next).copied().unwrap_or(v.from);
                    c.phase = if c.next < c.targets.len() {
                        IvPhase::Moving(t)
                    } else {
                        IvPhase::Returning
                    };
                    c.since = now;
                    c.start_v = vmon.unwrap_or(c.start_v);
                    exec.awaiting.insert(topic.clone(), now);
                    out.push(Effect::Command {
                        topic,
                        payload: show(t),
                    });
                    all_done = false;
                }
                IvPhase::Moving(t) => {
                    all_done = false;
                    let prev = if c.next == 0 {
                        v.from
                    } else {
                        c.targets[c.next - 1]
                    };
                    // From where the ramp really began (a resumed scan starts low).
                    let allowed = secs((t - c.start_v).abs() / v.ramp_rate * 3.0 + 30.0);
                    // Reached: within 1 % (1 V at least), and never as loose as half a
                    // step, or the last point's reading would count as this one's.
                    let tol = volt_tol(t).min(((t - prev).abs() / 2.0).max(0.05));
                    if vmon.is_some_and(|m| (m - t).abs() <= tol) {
                        c.phase = IvPhase::Settling(t);
                        c.since = now;
                    } else if now.saturating_duration_since(c.since) > allowed {
                        return Err(IvErr::Pause(format!(
                            "IV scan: channel {ch} did not reach {t} V within {} s (VMon {})",
                            allowed.as_secs(),
                            vmon.map_or("?".into(), show)
                        )));
                    }
                }
                IvPhase::Settling(t) => {
                    all_done = false;
                    if now.saturating_duration_since(c.since) < secs(v.settle_secs) {
                        continue;
                    }
                    let env = self.world.snapshot(&snap_chans, now);
                    let run = self.run.as_mut().expect("checked");
                    let curve = run.iv.entry(ch.clone()).or_insert_with(|| IvCurve {
                        points: vec![],
                        end: "scanning".into(),
                    });
                    curve.points.push(IvPoint {
                        t_ns: wall.as_nanos(),
                        v_set: t,
                        v: vmon,
                        i_ua: imon,
                        env,
                    });
                    let exec = self.exec.as_mut().expect("checked");
                    let c = exec
                        .iv
                        .as_mut()
                        .expect("set")
                        .chans
                        .get_mut(&ch)
                        .expect("listed");
                    c.next += 1;
                    c.start_v = vmon.unwrap_or(t);
                    let topic = format!("{}/cmd/setv/hv/{ch}", self.world.names().caen);
                    if imon.is_some_and(|i| i >= v.compliance_ua) {
                        curve.end = "compliance".into();
                        out.push(Effect::Log(false, format!("IV scan: channel {ch} at compliance ({} uA >= {} uA at {t} V): ramping down", show(imon.unwrap_or(0.0)), v.compliance_ua)));
                        c.phase = IvPhase::Returning;
                        c.since = now;
                        exec.awaiting.insert(topic.clone(), now);
                        out.push(Effect::Command {
                            topic,
                            payload: show(v.from),
                        });
                    } else if c.next >= c.targets.len() {
                        curve.end = "complete".into();
                        c.phase = IvPhase::Returning;
                        c.since = now;
                        exec.awaiting.insert(topic.clone(), now);
                        out.push(Effect::Command {
                            topic,
                            payload: show(v.from),
                        });
                    } else {
                        let nt = c.targets[c.next];
                        c.phase = IvPhase::Moving(nt);
                        c.since = now;
                        exec.awaiting.insert(topic.clone(), now);
                        out.push(Effect::Command {
                            topic,
                            payload: show(nt),
                        });
                    }
                }
                IvPhase::Returning => {
                    if vmon.is_some_and(|m| (m - v.from).abs() <= volt_tol(v.from)) {
                        c.phase = IvPhase::Finished;
                    } else {
                        all_done = false;
                        let allowed = secs((c.start_v - v.from).abs() / v.ramp_rate * 3.0 + 60.0);
                        if now.saturating_duration_since(c.since) > allowed {
                            return Err(IvErr::Pause(format!(
                                "IV scan: channel {ch} did not return to {} V within {} s",
                                v.from,
                                allowed.as_secs()
                            )));
                        }
                    }
                }
            }
        }
        Ok(all_done && self.exec.as_ref().is_some_and(|e| e.awaiting.is_empty()))
    }

    fn calibration_step(
        &mut self,
        c: &sequence::Calibration,
        now: Instant,
        out: &mut Vec<Effect>,
    ) -> Result<bool, String> {
        let Some(run) = self.run.as_ref() else {
            return Ok(true);
        };
        let bridge = self.world.names().ph2acf.clone();
        let busy = matches!(
            self.world.bridge.state.as_deref(),
            Some("running" | "stopping")
        );
        let exec = self.exec.as_mut().expect("running an action");
        let Some(cal) = exec.calibration.as_ref() else {
            if busy {
                // The run a pause stopped is still winding down: one run at a time.
                if now.saturating_duration_since(exec.since) > secs(c.timeout_secs) {
                    return Err(format!(
                        "calibration {}: the bridge stayed busy for {} s",
                        c.calibration, c.timeout_secs
                    ));
                }
                return Ok(false);
            }
            let topic = format!("{bridge}/cmd/run");
            let payload = json!({
                "calibration": c.calibration, "config": c.config,
                "modules": c.modules.as_ref().unwrap_or(&run.modules),
                "operator": run.operator, "comment": format!("burn-in {} {}", run.id, self.leaves.get(run.index).map_or("", |l| l.path.as_str())),
            });
            exec.awaiting.insert(topic.clone(), now);
            exec.calibration = Some(CalExec {
                before: self.world.bridge.last_run.as_ref().map(|l| l.0.clone()),
            });
            out.push(Effect::Command {
                topic,
                payload: payload.to_string(),
            });
            return Ok(false);
        };
        let b = &self.world.bridge;
        if let Some((id, status, err)) = &b.last_run {
            if Some(id) != cal.before.as_ref() && b.state.as_deref() == Some("idle") {
                let (id, status, err) = (id.clone(), status.clone(), err.clone());
                if let Some(s) = self.run.as_mut().and_then(|r| r.steps.last_mut()) {
                    s.data = json!({"ph2acf_run_id": id, "status": status, "error": err});
                }
                if status != "done" {
                    out.push(Effect::Log(
                        true,
                        format!(
                            "calibration {} run {id} ended {status}: recorded, the run goes on",
                            c.calibration
                        ),
                    ));
                }
                return Ok(true);
            }
        }
        if now.saturating_duration_since(exec_since(&self.exec)) > secs(c.timeout_secs) {
            out.push(Effect::Command {
                topic: format!("{bridge}/cmd/stop"),
                payload: String::new(),
            });
            return Err(format!(
                "calibration {} not finished after {} s",
                c.calibration, c.timeout_secs
            ));
        }
        Ok(false)
    }

    /// A `burnin_steps` point (tags `event`: `step_start`, `step_end`, `pause`,
    /// `resume`, `run_end`; `kind`, `run_id`, `sequence`): the step's index, path and outcome,
    /// the run's state, the reason of a pause or an end, the step's duration at its end.
    fn mark(&self, event: &str, reason: Option<&str>, wall: UtcNanos) -> Effect {
        let Some(run) = &self.run else {
            return Effect::Log(false, format!("{event} without a run"));
        };
        let step = run.steps.last().filter(|s| s.index == run.index);
        let mut fields = vec![
            ("index".to_string(), FieldValue::Int(run.index as i64)),
            ("path".into(), FieldValue::Str(self.path(run.index))),
            ("state".into(), FieldValue::Str(run.state.name().into())),
        ];
        if let Some(s) = step {
            fields.push(("outcome".into(), FieldValue::Str(s.outcome.clone())));
            if let Some(e) = s.end_ns {
                fields.push((
                    "duration_s".into(),
                    FieldValue::Float((e - s.start_ns) as f64 / 1e9),
                ));
            }
        }
        if let Some(r) = reason.filter(|r| !r.is_empty()) {
            fields.push(("reason".into(), FieldValue::Str(r.into())));
        }
        let kind = match event {
            "step_start" | "step_end" => step.map_or("step", |s| s.kind.as_str()),
            "pause" | "resume" => "pause",
            _ => "run",
        };
        Effect::Point(Point {
            measurement: "burnin_steps".into(),
            // `event` a tag: a step's end and the next step's start share an instant,
            // and points of one series at one instant replace each other.
            tags: vec![
                ("event".into(), event.into()),
                ("kind".into(), kind.into()),
                ("run_id".into(), run.id.clone()),
                ("sequence".into(), run.sequence.clone()),
            ],
            fields,
            timestamp_ns: wall.as_nanos(),
        })
    }

    /// The checkpoint of the run.
    fn checkpoint(&self) -> Effect {
        Effect::Checkpoint(
            self.run
                .as_ref()
                .map(|r| serde_json::to_value(r).unwrap_or(Json::Null)),
        )
    }

    /// `burnin/status`.
    pub fn status(&self, wall: UtcNanos) -> Effect {
        let Some(run) = &self.run else {
            return Effect::Status(
                json!({"state": "idle", "run_id": null, "time": wall.as_nanos()}),
            );
        };
        let (pause, phase) = match &run.state {
            RunState::Paused {
                reason,
                since_ns,
                manual,
            } => (
                json!({"reason": reason, "since_ns": since_ns, "by_operator": manual}),
                "paused",
            ),
            RunState::Restoring => (Json::Null, "restoring"),
            RunState::Ending { .. } => (Json::Null, "ending"),
            _ => (Json::Null, "step"),
        };
        let reason = match &run.state {
            RunState::Aborted { reason }
            | RunState::Failed { reason }
            | RunState::Ending { reason, .. } => Some(reason.clone()),
            _ => None,
        };
        let done = run.index.min(run.total);
        json!({
            "state": run.state.name(),
            "phase": phase,
            "run_id": run.id,
            "sequence": run.sequence,
            "operator": run.operator,
            "modules": run.modules,
            "step": {
                "index": run.index, "total": run.total, "path": self.path(run.index),
                "kind": self.leaves.get(run.index).map(|l| l.step.kind()),
            },
            "progress": if run.total == 0 { 100.0 } else { (done as f64 * 1000.0 / run.total as f64).round() / 10.0 },
            "eta_ns": self.eta(wall),
            "pause": pause,
            "pauses": run.pauses.len(),
            "reason": reason,
            "start_ns": run.start_ns,
            "end_ns": run.end_ns,
            "time": wall.as_nanos(),
        })
        .into_status()
    }

    /// Estimated end: each remaining step takes what the steps of its kind took so far
    /// in this run (mean), or before any has ended, a guess from the step itself (a
    /// soak its time, a cooling its hold plus 5 min, an IV scan its ramps and settling,
    /// a calibration 10 min, anything else 10 s).
    fn eta(&self, wall: UtcNanos) -> Option<i64> {
        let run = self.run.as_ref()?;
        if run.state.finished() || matches!(run.state, RunState::Ending { .. }) {
            return None;
        }
        let mut by_kind: BTreeMap<&str, (f64, u32)> = BTreeMap::new();
        for s in run.steps.iter().filter(|s| s.outcome == "done") {
            let e = by_kind.entry(s.kind.as_str()).or_default();
            e.0 += (s.end_ns.unwrap_or(s.start_ns) - s.start_ns) as f64 / 1e9;
            e.1 += 1;
        }
        // The step in progress counts for what is left of it.
        let elapsed = run
            .steps
            .last()
            .filter(|s| s.index == run.index && s.end_ns.is_none())
            .map_or(0.0, |s| (wall.as_nanos() - s.start_ns).max(0) as f64 / 1e9);
        let rest: f64 = self
            .leaves
            .iter()
            .skip(run.index)
            .enumerate()
            .map(|(i, l)| {
                (
                    i,
                    l,
                    match (&l.step, by_kind.get(l.step.kind())) {
                        (Step::Soak(s), _) => s.secs,
                        (_, Some((sum, n))) => sum / f64::from(*n),
                        (Step::Cooling(c), None) => c.hold_secs + 300.0,
                        (Step::IvScan(v), None) => {
                            let mut at = v.from;
                            let mut t = 0.0;
                            for p in v.points() {
                                t += (p - at).abs() / v.ramp_rate + v.settle_secs;
                                at = p;
                            }
                            t + (at - v.from).abs() / v.ramp_rate
                        }
                        (Step::Calibration(_), None) => 600.0,
                        _ => 10.0,
                    },
                )
            })
            .map(|(i, _, t)| if i == 0 { (t - elapsed).max(0.0) } else { t })
            .sum();
        Some(wall.as_nanos().saturating_add((rest * 1e9) as i64))
    }
}

fn exec_since(e: &Option<Exec>) -> Instant {
    e.as_ref().map_or_else(Instant::now, |e| e.since)
}

impl Exec {
    fn new(actions: VecDeque<Action>, now: Instant) -> Self {
        Exec {
            actions,
            since: now,
            holding: None,
            awaiting: BTreeMap::new(),
            sent_front: false,
            iv: None,
            calibration: None,
        }
    }
    fn pop(&mut self, now: Instant) {
        self.actions.pop_front();
        self.since = now;
        self.holding = None;
        self.sent_front = false;
        self.iv = None;
        self.calibration = None;
    }
}

trait IntoStatus {
    fn into_status(self) -> Effect;
}
impl IntoStatus for Json {
    fn into_status(self) -> Effect {
        Effect::Status(self)
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

/// A number as a command payload or in a message.
pub fn show(v: f64) -> String {
    dcs_shared::command::show_number(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::Names;
    use proptest::prelude::*;

    fn settings() -> Settings {
        Settings {
            hold: Duration::from_secs(2),
            max_pause: Duration::from_secs(3600),
            max_pauses: 5,
            reply_timeout: Duration::from_secs(5),
            interlock_max_age: Duration::from_secs(150),
            chiller_setpoint: 1,
            limits: Limits::default(),
        }
    }

    /// A plant model for the pure engine: commands take effect at once and are
    /// answered, as the real services do on the simulators (the integration tests use
    /// the real ones).
    struct Lab {
        engine: Engine,
        t0: Instant,
        now: Instant,
        wall: i64,
        temp: f64,
        lv: BTreeMap<String, bool>,
        hv: BTreeMap<String, bool>,
        hv_set: BTreeMap<String, f64>,
        /// IMon per volt, uA/V, per channel.
        leak: BTreeMap<String, f64>,
        interlock: &'static str,
        permit: bool,
        refuse: bool,
        sent: Vec<(String, String)>,
        bridge_run: u32,
        /// LV channels still ramping up (one clock step), as the CAEN FSM reports them.
        lv_ramping: std::collections::BTreeSet<String>,
    }

    const SEQ: &str = "steps:\n  - cooling: {temp: 20, hold_secs: 2}\n  - require: {rh_below: 60, dew_margin: 5}\n  - lv: {switch: \"on\"}\n  - hv: {set: 0}\n  - hv: {switch: \"on\"}\n  - repeat:\n      count: 2\n      steps:\n        - cooling: {temp: -30, hold_secs: 2}\n        - soak: {secs: 3}\n        - iv_scan: {segments: [{to: 50, step: 10}], ramp_rate: 50, settle_secs: 1, compliance_ua: 10}\n        - cooling: {temp: 20, hold_secs: 2}\n  - calibration: {calibration: pedenoise, config: PS_module}\n  - hv: {switch: \"off\"}\n  - lv: {switch: \"off\"}\n";

    impl Lab {
        fn new() -> Lab {
            let env = serde_yaml::from_str(
                "dew_point: {topic: \"+/sensors/BME/dew\", max_age_secs: 30}\nhumidity: {topic: \"+/sensors/BME/humi\", max_age_secs: 30}\n",
            )
            .unwrap();
            let t0 = Instant::now();
            let world = World::new(Names::default(), &env, t0);
            let mut lab = Lab {
                engine: Engine::new("burnin", settings(), world),
                t0,
                now: t0,
                wall: 1_800_000_000_000_000_000,
                temp: 20.0,
                lv: BTreeMap::new(),
                hv: BTreeMap::new(),
                hv_set: BTreeMap::new(),
                leak: [("0".to_string(), 0.01), ("1".to_string(), 0.01)].into(),
                interlock: "OK",
                permit: true,
                refuse: false,
                sent: vec![],
                bridge_run: 0,
                lv_ramping: Default::default(),
            };
            lab.publish_all();
            lab
        }

        fn w(&self) -> UtcNanos {
            UtcNanos(self.wall)
        }

        fn feed(&mut self, topic: &str, payload: &str) {
            let fx = self
                .engine
                .on_message(topic, payload.as_bytes(), self.now, self.w());
            self.carry(fx);
        }

        fn publish_all(&mut self) {
            let st = format!("{{\"state\": \"{}\"}}", self.interlock);
            self.feed("interlock/status", &st);
            let p = format!("{{\"lv_on\": {}}}", self.permit);
            self.feed("interlock/permits", &p);
            let c = format!("{{\"internal_temp\": {}, \"running\": true}}", self.temp);
            self.feed("julabo/status", &c);
            self.feed("ESP01/sensors/BME/dew", "-45");
            self.feed("ESP01/sensors/BME/humi", "5");
            for ch in ["0", "1"] {
                self.publish_channel(ch);
            }
        }

        fn publish_channel(&mut self, ch: &str) {
            let lv = self.lv.get(ch).copied().unwrap_or(false);
            let hv = self.hv.get(ch).copied().unwrap_or(false);
            let v = if hv {
                self.hv_set.get(ch).copied().unwrap_or(0.0)
            } else {
                0.0
            };
            let i = v * self.leak[ch];
            let lv_status = u8::from(lv) | if self.lv_ramping.contains(ch) { 2 } else { 0 };
            let doc = json!({"module": format!("m{ch}"), "lv_status": lv_status, "hv_status": u8::from(hv), "hv_vMon": v, "hv_iMon": i, "lv_vMon": if lv {12.0} else {0.0}});
            self.feed(&format!("dcs/channels/{ch}"), &doc.to_string());
        }

        fn carry(&mut self, fx: Vec<Effect>) {
            for e in fx {
                if let Effect::Command { topic, payload } = e {
                    self.sent.push((topic.clone(), payload.clone()));
                    self.act(&topic, &payload);
                }
            }
        }

        fn act(&mut self, topic: &str, payload: &str) {
            let parts: Vec<&str> = topic.split('/').collect();
            let svc = parts[0];
            let mut ok = !self.refuse;
            if ok {
                match parts.as_slice() {
                    ["julabo", "cmd", "setWT"] => {
                        let d: Json = serde_json::from_str(payload).unwrap();
                        self.temp = d["temp"].as_f64().unwrap();
                    }
                    ["dcs", "cmd", "switch", kind, ch] => {
                        let on = payload == "on";
                        if *kind == "lv" {
                            ok = !on || (self.permit && self.interlock == "OK");
                            if ok {
                                let was = self.lv.insert(ch.to_string(), on);
                                if on && was != Some(true) {
                                    self.lv_ramping.insert(ch.to_string());
                                }
                                if !on {
                                    self.hv.insert(ch.to_string(), false);
                                }
                            }
                        } else {
                            // As the CAEN FSM: HV on only once LV is on and done ramping.
                            ok = !on
                                || (self.lv.get(*ch) == Some(&true)
                                    && !self.lv_ramping.contains(*ch));
                            if ok {
                                self.hv.insert(ch.to_string(), on);
                            }
                        }
                    }
                    ["dcs", "cmd", "setv", "hv", ch] => {
                        self.hv_set.insert(ch.to_string(), payload.parse().unwrap());
                    }
                    ["ph2acf", "cmd", "run"] => {
                        self.bridge_run += 1;
                        let id = format!("R{}", self.bridge_run);
                        self.feed(
                            "ph2acf/status",
                            &json!({"state": "running", "run_id": id}).to_string(),
                        );
                        self.feed("ph2acf/status", &json!({"state": "idle", "run_id": null, "last_run": {"run_id": id, "status": "done", "error": null}}).to_string());
                    }
                    _ => {}
                }
            }
            let reply = json!({"topic": topic, "ok": ok, "state": "x", "error": if ok { Json::Null } else { json!("refused") }});
            let reply = if ok {
                json!({"topic": topic, "ok": true, "state": "x"})
            } else {
                reply
            };
            self.feed(&format!("{svc}/reply"), &reply.to_string());
            for ch in ["0", "1"] {
                self.publish_channel(ch);
            }
        }

        fn step(&mut self, ms: u64) {
            self.now += Duration::from_millis(ms);
            self.wall += i64::try_from(ms).unwrap() * 1_000_000;
            self.lv_ramping.clear();
            self.publish_all();
            let fx = self.engine.tick(self.now, self.w());
            self.carry(fx);
        }

        fn start(&mut self, text: &str) -> Result<(), String> {
            let seq =
                sequence::parse(text, std::path::Path::new("t.yaml"), Limits::default()).unwrap();
            let (r, fx) = self.engine.request(
                Request::Start {
                    name: "t".into(),
                    sequence: Box::new(seq),
                    text: text.into(),
                    modules: vec!["m0".into(), "m1".into()],
                    operator: "ana".into(),
                    comment: String::new(),
                },
                self.now,
                self.w(),
            );
            self.carry(fx);
            r
        }

        fn run_until(&mut self, pred: impl Fn(&Engine) -> bool, max_secs: u64) {
            for _ in 0..max_secs * 4 {
                if pred(&self.engine) {
                    return;
                }
                self.step(250);
            }
            panic!(
                "not reached in {max_secs} s: {:?}",
                self.engine.run().map(|r| (&r.state, r.index))
            );
        }

        fn state(&self) -> RunState {
            self.engine.run().unwrap().state.clone()
        }
    }

    fn done(e: &Engine) -> bool {
        e.run().is_some_and(|r| r.state.finished())
    }

    #[test]
    fn a_sequence_runs_to_the_end_with_iv_curves_and_its_calibration() {
        let mut lab = Lab::new();
        lab.start(SEQ).unwrap();
        assert!(lab.start(SEQ).unwrap_err().contains("abort it first"));
        lab.run_until(done, 600);
        let run = lab.engine.run().unwrap();
        assert_eq!(run.state, RunState::Done);
        assert_eq!(run.steps.len(), run.total, "{:#?}", run.pauses);
        assert!(run.pauses.is_empty(), "{:#?}", run.pauses);
        assert!(run.steps.iter().all(|s| s.outcome == "done"));
        let iv: Vec<&StepRecord> = run.steps.iter().filter(|s| s.kind == "iv_scan").collect();
        assert_eq!(iv.len(), 2);
        let curve = &iv[0].data["iv"]["0"];
        assert_eq!(curve["end"], "complete");
        let pts = curve["points"].as_array().unwrap();
        assert_eq!(pts.len(), 5);
        assert_eq!(pts[4]["v_set"], 50.0);
        assert_eq!(pts[4]["i_ua"], 0.5);
        // The conditions at that instant, with their ages.
        assert_eq!(pts[4]["env"]["env"]["dew_point"][0]["value"], -45.0);
        assert!(pts[4]["env"]["env"]["dew_point"][0]["age_s"].is_number());
        let cal = run.steps.iter().find(|s| s.kind == "calibration").unwrap();
        assert_eq!(cal.data["ph2acf_run_id"], "R1");
        // HV ends where the scan started, LV and HV off at the end.
        assert_eq!(lab.hv_set["0"], 0.0);
        assert!(!lab.lv["0"]);
    }

    #[test]
    fn an_interlock_alarm_pauses_without_a_fight_and_the_run_resumes_by_itself() {
        let mut lab = Lab::new();
        lab.start(SEQ).unwrap();
        lab.run_until(
            |e| e.run().is_some_and(|r| lab_kind(e, r.index) == "soak"),
            120,
        );
        let at = lab.engine.run().unwrap().index;
        // The interlock trips: it switches LV off itself and withdraws the permit.
        lab.interlock = "ALARM";
        lab.permit = false;
        lab.lv.clear();
        lab.hv.clear();
        lab.sent.clear();
        lab.step(250);
        assert!(
            matches!(lab.state(), RunState::Paused { ref reason, .. } if reason.contains("interlock ALARM")),
            "{:?}",
            lab.state()
        );
        for _ in 0..40 {
            lab.step(250);
        }
        assert!(
            lab.sent.is_empty(),
            "a paused run sends nothing: {:?}",
            lab.sent
        );
        lab.interlock = "OK";
        lab.permit = true;
        lab.step(250);
        assert!(
            matches!(lab.state(), RunState::Paused { .. }),
            "hold time first"
        );
        lab.run_until(
            |e| {
                e.run()
                    .is_some_and(|r| r.state == RunState::Running && r.index == at)
            },
            60,
        );
        // LV and HV were brought back before the step ran again.
        assert!(lab
            .sent
            .iter()
            .any(|(t, p)| t == "dcs/cmd/switch/lv/0" && p == "on"));
        assert!(lab
            .sent
            .iter()
            .any(|(t, p)| t == "dcs/cmd/switch/hv/1" && p == "on"));
        lab.run_until(done, 600);
        let run = lab.engine.run().unwrap();
        assert_eq!(run.state, RunState::Done);
        assert_eq!(run.pauses.len(), 1);
        assert!(run.pauses[0].end_ns.unwrap() > run.pauses[0].start_ns);
        let soak: Vec<_> = run
            .steps
            .iter()
            .filter(|s| s.index == at)
            .map(|s| s.outcome.as_str())
            .collect();
        assert_eq!(soak, ["interrupted", "done"]);
    }

    fn lab_kind(e: &Engine, i: usize) -> &'static str {
        e.leaves.get(i).map_or("end", |l| l.step.kind())
    }

    #[test]
    fn a_restarted_sequencer_resumes_at_its_step_and_repeats_nothing_done() {
        let mut lab = Lab::new();
        lab.start(SEQ).unwrap();
        lab.run_until(|e| e.run().is_some_and(|r| r.index == 7), 120);
        let doc = serde_json::to_value(lab.engine.run().unwrap()).unwrap();
        // A new process: the same lab, a new engine from the checkpoint.
        let env = serde_yaml::from_str("dew_point: {topic: \"+/sensors/BME/dew\", max_age_secs: 30}\nhumidity: {topic: \"+/sensors/BME/humi\", max_age_secs: 30}\n").unwrap();
        lab.engine = Engine::new(
            "burnin",
            settings(),
            World::new(Names::default(), &env, lab.now),
        );
        let fx = lab
            .engine
            .restore(serde_json::from_value(doc).unwrap(), lab.now, lab.w());
        lab.carry(fx);
        assert!(
            matches!(lab.state(), RunState::Paused { ref reason, .. } if reason.contains("restarted"))
        );
        lab.run_until(done, 600);
        let run = lab.engine.run().unwrap();
        assert_eq!(run.state, RunState::Done, "{:#?}", run.pauses);
        for i in 0..run.total {
            let n = run
                .steps
                .iter()
                .filter(|s| s.index == i && s.outcome == "done")
                .count();
            assert_eq!(n, 1, "step {i} done once");
        }
        let _ = lab.t0;
    }

    #[test]
    fn a_sequencer_killed_while_ending_a_run_finishes_switching_off() {
        let mut lab = Lab::new();
        lab.start(SEQ).unwrap();
        lab.run_until(|e| e.run().is_some_and(|r| r.index == 7), 120);
        let mut doc = serde_json::to_value(lab.engine.run().unwrap()).unwrap();
        // The checkpoint of an abort in progress (HV and LV not yet off).
        doc["state"] =
            json!({"state": "ending", "end": "aborted", "reason": "aborted by ana: leak"});
        let env = serde_yaml::from_str("dew_point: {topic: \"+/sensors/BME/dew\", max_age_secs: 30}\nhumidity: {topic: \"+/sensors/BME/humi\", max_age_secs: 30}\n").unwrap();
        lab.engine = Engine::new(
            "burnin",
            settings(),
            World::new(Names::default(), &env, lab.now),
        );
        lab.sent.clear();
        let fx = lab
            .engine
            .restore(serde_json::from_value(doc).unwrap(), lab.now, lab.w());
        lab.carry(fx);
        for _ in 0..20 {
            lab.step(250);
        }
        assert!(
            matches!(lab.state(), RunState::Aborted { ref reason } if reason.contains("leak")),
            "{:?}",
            lab.state()
        );
        let sent: Vec<String> = lab.sent.iter().map(|(t, p)| format!("{t} {p}")).collect();
        assert_eq!(
            sent,
            [
                "dcs/cmd/switch/hv/0 off",
                "dcs/cmd/switch/hv/1 off",
                "dcs/cmd/switch/lv/0 off",
                "dcs/cmd/switch/lv/1 off"
            ]
        );
    }

    #[test]
    fn an_operator_can_hold_a_run_that_paused_by_itself() {
        let mut lab = Lab::new();
        lab.start(SEQ).unwrap();
        lab.run_until(|e| e.run().is_some_and(|r| r.index == 6), 120);
        lab.interlock = "ALARM";
        lab.step(250);
        assert!(matches!(
            lab.state(),
            RunState::Paused { manual: false, .. }
        ));
        let (r, fx) = lab.engine.request(
            Request::Pause {
                operator: "ana".into(),
                reason: "box open".into(),
            },
            lab.now,
            lab.w(),
        );
        lab.carry(fx);
        r.unwrap();
        lab.interlock = "OK";
        lab.sent.clear();
        for _ in 0..40 {
            lab.step(250);
        }
        assert!(
            matches!(lab.state(), RunState::Paused { manual: true, ref reason, .. } if reason.contains("held by ana: box open")),
            "{:?}",
            lab.state()
        );
        assert!(lab.sent.is_empty(), "{:?}", lab.sent);
        let (r, fx) = lab.engine.request(
            Request::Resume {
                operator: "ana".into(),
            },
            lab.now,
            lab.w(),
        );
        lab.carry(fx);
        r.unwrap();
        lab.run_until(done, 600);
        assert_eq!(lab.state(), RunState::Done);
    }

    #[test]
    fn hv_is_never_switched_on_over_an_lv_that_is_off() {
        let mut lab = Lab::new();
        lab.start("steps:\n  - hv: {switch: \"on\"}\n").unwrap();
        for _ in 0..8 {
            lab.step(250);
        }
        assert!(
            matches!(lab.state(), RunState::Failed { ref reason } if reason.contains("never switched on")),
            "{:?}",
            lab.state()
        );
        assert!(
            !lab.sent
                .iter()
                .any(|(t, p)| t.contains("/switch/hv/") && p == "on"),
            "{:?}",
            lab.sent
        );
    }

    #[test]
    fn compliance_stops_that_channel_and_the_others_finish() {
        let mut lab = Lab::new();
        lab.leak.insert("1".into(), 0.4); // 10 uA at 25 V
        lab.start(SEQ).unwrap();
        lab.run_until(done, 600);
        let run = lab.engine.run().unwrap();
        let iv = run.steps.iter().find(|s| s.kind == "iv_scan").unwrap();
        assert_eq!(iv.data["iv"]["1"]["end"], "compliance");
        assert_eq!(iv.data["iv"]["1"]["points"].as_array().unwrap().len(), 3);
        assert_eq!(iv.data["iv"]["0"]["end"], "complete");
        assert_eq!(lab.hv_set["1"], 0.0);
    }

    #[test]
    fn a_start_is_refused_while_the_interlock_is_not_ok() {
        let mut lab = Lab::new();
        lab.interlock = "ALARM";
        lab.step(250);
        assert!(lab.start(SEQ).unwrap_err().contains("interlock ALARM"));
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Wait(u16),
        Interlock(bool),
        Permit(bool),
        Refuse(bool),
        Pause,
        Resume,
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            6 => (1u16..4000).prop_map(Ev::Wait),
            1 => any::<bool>().prop_map(Ev::Interlock),
            1 => any::<bool>().prop_map(Ev::Permit),
            1 => any::<bool>().prop_map(Ev::Refuse),
            1 => Just(Ev::Pause),
            1 => Just(Ev::Resume),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever happens, the sequencer never fights the interlock: no LV on, HV on
        /// or coolant change is sent while the interlock is not OK, no LV on without
        /// the permit, no HV on for a channel whose LV is off, nothing beyond limits.
        #[test]
        fn the_sequencer_never_fights_the_interlock(events in proptest::collection::vec(ev(), 1..120)) {
            let mut lab = Lab::new();
            lab.start(SEQ).unwrap();
            for e in events {
                lab.sent.clear();
                match e {
                    Ev::Wait(ms) => lab.step(u64::from(ms)),
                    Ev::Interlock(ok) => {
                        lab.interlock = if ok { "OK" } else { "ALARM" };
                        if !ok {
                            // What the interlock does: LV (and so HV) off.
                            lab.lv.clear();
                            lab.hv.clear();
                        }
                        lab.step(10);
                    }
                    Ev::Permit(p) => { lab.permit = p; lab.step(10); }
                    Ev::Refuse(r) => { lab.refuse = r; lab.step(10); }
                    Ev::Pause => {
                        let (_, fx) = lab.engine.request(Request::Pause { operator: "o".into(), reason: "r".into() }, lab.now, lab.w());
                        lab.carry(fx);
                    }
                    Ev::Resume => {
                        let (_, fx) = lab.engine.request(Request::Resume { operator: "o".into() }, lab.now, lab.w());
                        lab.carry(fx);
                    }
                }
                let lv_before = lab.lv.clone();
                for (t, p) in &lab.sent {
                    let raising = t.ends_with("/cmd/setWT") || (t.contains("/switch/") && p == "on");
                    prop_assert!(!(raising && lab.interlock != "OK"), "{t} {p} sent while the interlock is {}", lab.interlock);
                    if t.contains("/switch/lv/") && p == "on" {
                        prop_assert!(lab.permit, "LV on without the permit");
                    }
                    if let Some(ch) = t.strip_prefix("dcs/cmd/switch/hv/") {
                        if p == "on" {
                            prop_assert!(lv_before.get(ch) == Some(&true) || lab.lv.get(ch) == Some(&true), "HV on with LV off on {ch}");
                        }
                    }
                    if t.contains("/setv/hv/") {
                        let v: f64 = p.parse().unwrap();
                        prop_assert!((0.0..=800.0).contains(&v));
                    }
                }
            }
        }
    }
}
