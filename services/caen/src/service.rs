//! The `caen-fsm` service: watches every PV, derives the states, publishes
//! `<name>/status` and `<name>/channels`, and carries out `<name>/cmd/...` with one
//! reply per command (SPEC 3.4).
//!
//! The decisions are [`Control`]'s (pure); this is the I/O around it: one task owns
//! the state, carries out the writes a plan asks for (concurrently, each with a
//! timeout) and feeds back which failed. An LV-off sequence waiting for HV to ramp
//! down does not block anything: its reply is sent when it ends.
//!
//! Publication: a channel object goes out when it changed (an identical one is not
//! sent again: the dozens of disconnect events of one IOC loss make one message per
//! channel); the system state on `<name>/status` once the channel states have been
//! still for [`SETTLE`], so one cause (every channel ramping down after one `off`)
//! gives one transition, not a transient `LV_MIX` per status update.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcs_shared::command;
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{Message, MqttSettings, QoS, Session, SessionEvent, SessionOptions, UtcNanos};
use serde_json::json;
use tokio::sync::mpsc;

use crate::ca::{CaEvent, ChannelAccess, PutValue, Watch};
use crate::commands::CaenCommand;
use crate::config::CaenConfig;
use crate::control::{self, Control, Outcome, Plan, Then, Write};
use crate::fsm::SystemState;
use crate::permit::Permit;
use crate::plant::{Change, Plant};
use crate::pv::{self, Side};

/// How long the channel states must be still before a new system state is published.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The service state, owned by one task.
pub struct Service<C: ChannelAccess> {
    cfg: CaenConfig,
    config_path: Option<PathBuf>,
    ca: Arc<C>,
    control: Control,
    watches: Vec<Watch>,
    events: mpsc::UnboundedSender<CaEvent>,
    /// Events of the current watches. Replaced with them on reload/reconnect, so an
    /// event still queued from an old watch can never land on a new slot.
    events_rx: mpsc::UnboundedReceiver<CaEvent>,
    /// Commands answered later (LV-off sequences), by request number.
    pending: HashMap<u64, Message>,
    next_req: u64,
    /// The system state last published, and when the channel states last changed.
    shown: Option<SystemState>,
    last_change: Instant,
    /// The channel objects last published, by channel index.
    shown_channels: Vec<String>,
    dropped_updates: u64,
    /// The interlock's say on LV on.
    pub permit: Permit,
}

impl<C: ChannelAccess> Service<C> {
    /// Builds the plant of `cfg` and starts watching its PVs.
    pub fn new(cfg: CaenConfig, config_path: Option<PathBuf>, ca: Arc<C>) -> Self {
        let (events, events_rx) = mpsc::unbounded_channel();
        let key_file = cfg
            .safety
            .permit_key_file
            .as_ref()
            .map(|f| match &config_path {
                Some(c) => dcs_shared::config::relative_to(c, f),
                None => f.clone(),
            });
        let permit = Permit::new(
            cfg.safety.interlock.as_deref(),
            key_file,
            cfg.safety.permit_max_age_secs,
        );
        let plant = Plant::new(
            &cfg.prefix,
            cfg.resolved(),
            timeout(cfg.ca.connect_timeout_secs),
        );
        let mut svc = Service {
            control: Control::new(plant, cfg.safety.clone()),
            cfg,
            config_path,
            ca,
            watches: Vec::new(),
            events,
            events_rx,
            pending: HashMap::new(),
            next_req: 1,
            shown: None,
            last_change: Instant::now(),
            shown_channels: Vec::new(),
            dropped_updates: 0,
            permit,
        };
        svc.start_watches();
        svc
    }

    fn start_watches(&mut self) {
        self.watches.clear();
        (self.events, self.events_rx) = mpsc::unbounded_channel();
        let plant = &self.control.plant;
        self.watches = plant
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                self.ca
                    .watch(i, &s.pv, s.param.deadband(), self.events.clone())
            })
            .collect();
        self.shown_channels = vec![String::new(); plant.channels.len()];
        tracing::info!(
            channels = plant.channels.len(),
            pvs = plant.slots.len(),
            prefix = %plant.prefix,
            "watching PVs"
        );
    }

    /// The plant (for inspection).
    pub fn plant(&self) -> &Plant {
        &self.control.plant
    }

    /// The state replies carry: the system state as derived now.
    fn state(&self) -> &'static str {
        self.control.plant.system().as_str()
    }

    /// Applies one CA event; settings are written when a channel comes up.
    pub fn apply(&mut self, ev: &CaEvent) {
        if let Change::CameUp(ci) = self.control.plant.apply(ev) {
            self.write_settings(ci);
        }
    }

    /// Writes the configured settings of an active channel, one after the other in
    /// the plan's order (after load, reload and every reconnect: an IOC restarted
    /// without autosave forgets them). The channel takes no switch-on until they
    /// have been read back (see [`control`]).
    fn write_settings(&self, ci: usize) {
        let plant = &self.control.plant;
        let ch = &plant.channels[ci];
        if !ch.cfg.active() {
            return;
        }
        let writes: Vec<(String, PutValue)> = control::settings(ch, ci)
            .into_iter()
            .map(|w| (plant.pv(ci, w.side, w.param), w.value))
            .collect();
        let ca = self.ca.clone();
        let t = timeout(self.cfg.ca.put_timeout_secs);
        let id = ch.cfg.id.clone();
        tokio::spawn(async move {
            let n = writes.len();
            let mut failed = 0;
            for (pv, v) in writes {
                if let Err(e) = ca.put(&pv, v, t).await {
                    failed += 1;
                    tracing::warn!(channel = %id, error = %e, "cannot write setting");
                }
            }
            tracing::info!(channel = %id, written = n - failed, failed, "settings written");
        });
    }

    /// Carries out `writes` concurrently; returns the failed ones with why.
    async fn put_many(&self, writes: &[Write]) -> Vec<(Write, String)> {
        let mut set = tokio::task::JoinSet::new();
        let t = timeout(self.cfg.ca.put_timeout_secs);
        for w in writes {
            let ca = self.ca.clone();
            let pv = self.control.plant.pv(w.channel, w.side, w.param);
            tracing::info!(%pv, value = %w.value, "write");
            let w = w.clone();
            set.spawn(async move {
                let r = ca.put(&pv, w.value.clone(), t).await;
                (w, r)
            });
        }
        let mut failed = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok((w, Err(e))) => failed.push((w, e.to_string())),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "write task failed"),
            }
        }
        failed
    }

    /// Carries out a plan for the command `msg` (request `req`); `None` when its reply
    /// comes later.
    async fn carry_out(&mut self, req: u64, plan: Plan, msg: &Message) -> Option<Outcome> {
        match plan {
            Plan::Reply(out) => Some(out),
            Plan::Write(writes, then) => {
                let failed = self.put_many(&writes).await;
                let out = self.control.written(&writes, then, &failed);
                if out.is_none() {
                    self.pending.insert(req, msg.clone());
                }
                out
            }
        }
    }

    /// Carries out a command. `None` means the reply comes later (LV-off sequence).
    pub async fn execute(&mut self, cmd: CaenCommand, msg: &Message) -> Option<Outcome> {
        let req = self.next_req;
        self.next_req += 1;
        Some(match cmd {
            CaenCommand::Refresh => {
                self.control.plant.mark_all_dirty();
                self.shown_channels.iter_mut().for_each(String::clear);
                Ok(())
            }
            CaenCommand::Clear => {
                let pv = pv::clear_alarm(&self.control.plant.prefix);
                let t = timeout(self.cfg.ca.put_timeout_secs);
                tracing::info!(%pv, "clear alarms");
                self.ca
                    .put(&pv, PutValue::Label("Yes".into()), t)
                    .await
                    .map_err(|e| e.to_string())
            }
            CaenCommand::SetV {
                side,
                channel,
                volts,
            } => {
                let plan = self.control.setv(side, &channel, volts);
                return self.carry_out(req, plan, msg).await;
            }
            CaenCommand::Switch { side, on, channel } => {
                let permit = if side == Side::Lv && on {
                    self.permit.check_lv_on(UtcNanos::now())
                } else {
                    Ok(())
                };
                let plan =
                    self.control
                        .switch(req, side, on, channel.as_deref(), permit, Instant::now());
                return self.carry_out(req, plan, msg).await;
            }
            CaenCommand::Reload => self.reload(),
            CaenCommand::Reconnect => {
                if self.control.in_sequence() {
                    Err(
                        "an LV switch-off is in progress: reconnect when it has been answered"
                            .into(),
                    )
                } else {
                    self.rebuild(self.cfg.clone());
                    Ok(())
                }
            }
        })
    }

    /// Moves LV-off sequences on; returns the finished ones with their outcome.
    pub async fn progress(&mut self, now: Instant) -> Vec<(Message, Outcome)> {
        let (writes, ended) = self.control.step(now);
        let mut finished: Vec<(u64, Outcome)> = ended;
        for (req, w) in writes {
            let failed = self.put_many(&w).await;
            if let Some(out) = self.control.written(&w, Then::LvOff(req), &failed) {
                finished.push((req, out));
            }
        }
        finished
            .into_iter()
            .filter_map(|(req, out)| Some((self.pending.remove(&req)?, out)))
            .collect()
    }

    fn reload(&mut self) -> Outcome {
        let Some(path) = self.config_path.clone() else {
            return Err(
                "this service was not started from a config file: nothing to reload".into(),
            );
        };
        if self.control.in_sequence() {
            return Err("an LV switch-off is in progress: reload when it has been answered".into());
        }
        let cfg = dcs_shared::program::load::<crate::CaenFsm>(&path)
            .map_err(|e| format!("config not reloaded, the running one is kept: {e}"))?;
        if cfg.name != self.cfg.name {
            return Err(format!(
                "config not reloaded: `name` changed from {} to {} (topics would change): restart the service",
                self.cfg.name, cfg.name
            ));
        }
        if cfg.ca.addr_list != self.cfg.ca.addr_list {
            return Err("config not reloaded: `ca.addr_list` changed: restart the service".into());
        }
        if cfg.safety.interlock != self.cfg.safety.interlock {
            // Its topics are subscribed at start; switching the interlock off by a reload
            // would also be too easy.
            return Err(
                "config not reloaded: `safety.interlock` changed: restart the service".into(),
            );
        }
        tracing::info!(file = %path.display(), channels = cfg.channels.len(), "config reloaded");
        self.rebuild(cfg);
        Ok(())
    }

    /// New plant and watches (reload, reconnect): every channel starts not ready, its
    /// settings written again. Set-points given over MQTT survive for channels that
    /// keep their id and supplies.
    fn rebuild(&mut self, cfg: CaenConfig) {
        let mut plant = Plant::new(
            &cfg.prefix,
            cfg.resolved(),
            timeout(cfg.ca.connect_timeout_secs),
        );
        let old = &self.control.plant;
        for ch in &mut plant.channels {
            if let Some(o) = old.channels.iter().find(|o| {
                o.cfg.id == ch.cfg.id
                    && (o.cfg.lv_board, o.cfg.lv_chan, o.cfg.hv_board, o.cfg.hv_chan)
                        == (
                            ch.cfg.lv_board,
                            ch.cfg.lv_chan,
                            ch.cfg.hv_board,
                            ch.cfg.hv_chan,
                        )
            }) {
                ch.set_v_override = o.set_v_override;
            }
        }
        self.control = Control::new(plant, cfg.safety.clone());
        self.cfg = cfg;
        self.start_watches();
    }

    fn status_json(&self, state: SystemState) -> String {
        json!({ "fsm_state": state.as_str() }).to_string()
    }

    /// When the system state is to be looked at again (a change waiting to settle).
    fn settle_at(&self) -> Option<Instant> {
        (self.shown != Some(self.control.plant.system())).then_some(self.last_change + SETTLE)
    }

    /// Re-derives the states and publishes what changed (the system state once the
    /// channel states have settled).
    fn publish(&mut self, session: &Session, force_status: bool) {
        let now = Instant::now();
        let (changed, _) = self.control.plant.update_states(now);
        if !changed.is_empty() {
            self.last_change = now;
        }
        let system = self.control.plant.system();
        let settled = now.duration_since(self.last_change) >= SETTLE;
        if (self.shown != Some(system) && settled) || force_status {
            if self.shown != Some(system) {
                tracing::info!(state = system.as_str(), "system state");
            }
            self.shown = Some(system);
            session.publish_state(&session.topic("status"), self.status_json(system));
        }
        let name = &self.cfg.name;
        for ci in self.control.plant.take_dirty() {
            let ch = &self.control.plant.channels[ci];
            let payload = ch.to_json().to_string();
            if self.shown_channels.get(ci) == Some(&payload) {
                continue;
            }
            // The stream dashboards and telemetry read, plus each channel's last state
            // retained on its own topic for clients that connect later.
            session.publish_state(&format!("{name}/channels/{}", ch.cfg.id), payload.clone());
            if let Some(s) = self.shown_channels.get_mut(ci) {
                s.clone_from(&payload);
            }
            // Before the first connection the retained copy above is all there is to keep.
            if session.is_connected()
                && !session.try_publish(
                    &format!("{name}/channels"),
                    payload,
                    QoS::AtLeastOnce,
                    false,
                )
            {
                self.dropped_updates += 1;
                if self.dropped_updates.is_power_of_two() {
                    tracing::warn!(
                        dropped = self.dropped_updates,
                        "channel updates dropped (broker away or slow); retained per-channel state is kept"
                    );
                }
            }
        }
    }
}

fn timeout(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(1))
}

/// Runs until `shutdown`.
pub async fn run<C: ChannelAccess>(
    cfg: CaenConfig,
    config_path: Option<PathBuf>,
    mqtt: MqttSettings,
    ca: Arc<C>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = cfg.name.clone();
    let refresh = cfg.timing.refresh_secs;
    let mut fsm = Service::new(cfg, config_path, ca);
    let mut options =
        SessionOptions::new(&name).subscribe(&format!("{name}/cmd/#"), QoS::AtLeastOnce);
    for f in fsm.permit.filters() {
        options = options.subscribe(&f, QoS::AtLeastOnce);
    }
    let (session, mut mqtt_events) = Session::start(&mqtt, options)?;
    fsm.publish(&session, true);

    // Time-driven changes: the connection timeout and the LV-off deadline.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh_tick =
        tokio::time::interval(timeout(if refresh > 0.0 { refresh } else { 3600.0 }));
    refresh_tick.tick().await;
    loop {
        let settle_at = fsm.settle_at();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = fsm.events_rx.recv() => {
                let Some(ev) = ev else { break };
                fsm.apply(&ev);
                // Take what else is queued, then publish once: a burst of monitor
                // updates becomes one message per channel.
                for _ in 0..10_000 {
                    match fsm.events_rx.try_recv() {
                        Ok(ev) => fsm.apply(&ev),
                        Err(_) => break,
                    }
                }
                fsm.publish(&session, false);
                for (msg, outcome) in fsm.progress(Instant::now()).await {
                    fsm.publish(&session, false);
                    session.answer(&msg, outcome, fsm.state()).await;
                }
            }
            _ = tick.tick() => {
                fsm.publish(&session, false);
                for (msg, outcome) in fsm.progress(Instant::now()).await {
                    session.answer(&msg, outcome, fsm.state()).await;
                }
            }
            _ = sleep_until_opt(settle_at) => fsm.publish(&session, false),
            _ = refresh_tick.tick(), if refresh > 0.0 => {
                fsm.control.plant.mark_all_dirty();
                fsm.shown_channels.iter_mut().for_each(String::clear);
                fsm.publish(&session, true);
            }
            ev = mqtt_events.recv() => match ev {
                None => break,
                Some(SessionEvent::Message(msg)) => {
                    if fsm.permit.ingest(&msg.topic, &msg.payload, UtcNanos::now()) {
                        continue;
                    }
                    let Some(parsed) = command::parse::<CaenCommand>(&name, &msg) else { continue };
                    let outcome = match parsed {
                        Err(e) => Some(Err(e.to_string())),
                        Ok(cmd) => {
                            let force = matches!(cmd, CaenCommand::Refresh);
                            let out = fsm.execute(cmd, &msg).await;
                            fsm.publish(&session, force);
                            out
                        }
                    };
                    if let Some(outcome) = outcome {
                        session.answer(&msg, outcome, fsm.state()).await;
                    }
                }
                Some(_) => {}
            },
        }
    }
    for req in fsm.control.abort_sequences() {
        let Some(msg) = fsm.pending.remove(&req) else {
            continue;
        };
        session
            .answer(
                &msg,
                Err("the service stopped before HV had ramped down: LV left on".into()),
                fsm.state(),
            )
            .await;
    }
    session.shutdown().await;
    Ok(())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
