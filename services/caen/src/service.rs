//! The `caen-fsm` service: watches every PV, derives the states, publishes
//! `<name>/status` and `<name>/channels`, and carries out `<name>/cmd/...` with the
//! safety rules of SPEC 4.4 and one reply per command (SPEC 3.4).
//!
//! One task owns all state. CA writes run concurrently per command and are awaited
//! with a timeout; the LV-off sequence (HV first, then LV once HV is below the safe
//! voltage) is event-driven, so other commands and updates keep flowing while HV ramps
//! down, and its reply is sent when it ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dcs_shared::command;
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{
    Message, MqttSettings, QoS, Reply, Session, SessionEvent, SessionOptions, UtcNanos,
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::ca::{CaEvent, ChannelAccess, PutError, PutValue, Watch};
use crate::commands::CaenCommand;
use crate::config::CaenConfig;
use crate::fsm::ChannelState;
use crate::permit::Permit;
use crate::plant::{Change, Plant};
use crate::pv::{self, Param, Side};

/// An LV switch-off waiting for HV to ramp down on some channels.
struct Sequence {
    /// The command being answered.
    command: Message,
    /// Channels whose HV has not yet reached the safe voltage.
    waiting: Vec<usize>,
    /// Channels done.
    done: Vec<String>,
    /// Why some channels could not be switched off.
    failed: Vec<String>,
    deadline: Instant,
}

/// The service state, owned by one task.
pub struct Fsm<C: ChannelAccess> {
    cfg: CaenConfig,
    config_path: Option<PathBuf>,
    ca: Arc<C>,
    plant: Plant,
    watches: Vec<Watch>,
    events: mpsc::UnboundedSender<CaEvent>,
    /// Events of the current watches. Replaced with them on reload/reconnect, so an
    /// event still queued from an old watch can never land on a new slot.
    events_rx: mpsc::UnboundedReceiver<CaEvent>,
    sequences: Vec<Sequence>,
    dropped_updates: u64,
    /// The interlock's say on LV on.
    pub permit: Permit,
}

type Outcome = Result<(), String>;

impl<C: ChannelAccess> Fsm<C> {
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
        let mut fsm = Fsm {
            plant: Plant::new(
                &cfg.prefix,
                cfg.resolved(),
                timeout(cfg.ca.connect_timeout_secs),
            ),
            cfg,
            config_path,
            ca,
            watches: Vec::new(),
            events,
            events_rx,
            sequences: Vec::new(),
            dropped_updates: 0,
            permit,
        };
        fsm.start_watches();
        fsm
    }

    fn start_watches(&mut self) {
        self.watches.clear();
        (self.events, self.events_rx) = mpsc::unbounded_channel();
        self.watches = self
            .plant
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                self.ca
                    .watch(i, &s.pv, s.param.deadband(), self.events.clone())
            })
            .collect();
        tracing::info!(
            channels = self.plant.channels.len(),
            pvs = self.plant.slots.len(),
            prefix = %self.plant.prefix,
            "watching PVs"
        );
    }

    /// The plant (for inspection).
    pub fn plant(&self) -> &Plant {
        &self.plant
    }

    fn state(&self) -> &'static str {
        self.plant.system().as_str()
    }

    /// Applies one CA event; settings are written when a channel comes up.
    pub fn apply(&mut self, ev: &CaEvent) {
        if let Change::CameUp(ci) = self.plant.apply(ev) {
            self.write_settings(ci);
        }
    }

    /// Writes the configured settings of an active channel (after load, reload and
    /// every reconnect: an IOC restarted without autosave forgets them).
    fn write_settings(&self, ci: usize) {
        let ch = &self.plant.channels[ci];
        if !ch.cfg.active() {
            return;
        }
        let lv = &ch.cfg.lv;
        let hv = &ch.cfg.hv;
        let num = |v: Option<f64>| v.map(PutValue::Number);
        let int = |v: Option<i64>| v.map(|i| PutValue::Number(i as f64));
        let mut writes: Vec<(Side, Param, Option<PutValue>)> = vec![
            (
                Side::Lv,
                Param::V0Set,
                num(ch.set_v_override[0].or(lv.set_v)),
            ),
            (Side::Lv, Param::I0Set, num(lv.max_i)),
            (Side::Lv, Param::Trip, num(lv.trip_time)),
            (Side::Lv, Param::TripInt, int(lv.trip_int)),
            (Side::Lv, Param::TripExt, int(lv.trip_ext)),
            (Side::Lv, Param::UnVThr, num(lv.un_v_thr)),
            (Side::Lv, Param::OvVThr, num(lv.ov_v_thr)),
            (Side::Lv, Param::RUpTime, num(lv.ramp_up_time)),
            (Side::Lv, Param::RDwTime, num(lv.ramp_dwn_time)),
            (
                Side::Hv,
                Param::V0Set,
                num(ch.set_v_override[1].or(hv.set_v)),
            ),
            (Side::Hv, Param::I0Set, num(hv.max_i)),
            (Side::Hv, Param::RUp, num(hv.ramp_up_speed)),
            (Side::Hv, Param::RDwn, num(hv.ramp_dwn_speed)),
            (Side::Hv, Param::Trip, num(hv.trip_time)),
            (Side::Hv, Param::TripInt, int(hv.trip_int)),
            (Side::Hv, Param::TripExt, int(hv.trip_ext)),
        ];
        writes.push((
            Side::Hv,
            Param::PDwn,
            hv.trip_mode.map(|m| PutValue::Label(m.label().into())),
        ));
        writes.push((
            Side::Hv,
            Param::ImRange,
            hv.im_range.map(|m| PutValue::Label(m.label().into())),
        ));
        let writes: Vec<(String, PutValue)> = writes
            .into_iter()
            .filter_map(|(side, param, v)| Some((self.plant.pv(ci, side, param), v?)))
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

    /// Writes concurrently; returns the failures as `channel id: error`.
    async fn put_many(&self, writes: Vec<(usize, String, PutValue)>) -> Vec<(usize, PutError)> {
        let mut set = tokio::task::JoinSet::new();
        let t = timeout(self.cfg.ca.put_timeout_secs);
        for (ci, pv, v) in writes {
            let ca = self.ca.clone();
            tracing::info!(%pv, value = %v, "write");
            set.spawn(async move { (ci, ca.put(&pv, v, t).await) });
        }
        let mut failed = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok((ci, Err(e))) = r {
                failed.push((ci, e));
            }
        }
        failed
    }

    fn describe_failures(&self, failed: &[(usize, PutError)]) -> String {
        failed
            .iter()
            .map(|(ci, e)| format!("channel {}: {e}", self.plant.channels[*ci].cfg.id))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Channels a command addresses: one (must exist and be active) or all active ones.
    fn targets(&self, channel: Option<&str>) -> Result<Vec<usize>, String> {
        match channel {
            Some(id) => {
                let ci = self.plant.find(id).ok_or_else(|| {
                    format!("no channel `{}` in the config", command::truncate(id, 30))
                })?;
                if !self.plant.channels[ci].cfg.active() {
                    return Err(format!(
                        "channel {id} has no module: it is monitored, not commanded"
                    ));
                }
                Ok(vec![ci])
            }
            None => Ok((0..self.plant.channels.len())
                .filter(|i| self.plant.channels[*i].cfg.active())
                .collect()),
        }
    }

    fn check_free(&self, targets: &[usize]) -> Result<(), String> {
        for s in &self.sequences {
            if let Some(ci) = targets.iter().find(|c| s.waiting.contains(c)) {
                return Err(format!(
                    "channel {} is switching LV off (waiting for its HV to ramp down); \
                     try again when that command has been answered",
                    self.plant.channels[*ci].cfg.id
                ));
            }
        }
        Ok(())
    }

    fn check_connected(&self, targets: &[usize]) -> Result<(), String> {
        let down: Vec<&str> = targets
            .iter()
            .filter(|c| !self.plant.channels[**c].connected())
            .map(|c| self.plant.channels[*c].cfg.id.as_str())
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "not connected to the supply for channel(s) {}: nothing was changed",
                down.join(", ")
            ))
        }
    }

    /// Carries out a command. `None` means the reply comes later (LV-off sequence).
    pub async fn execute(&mut self, cmd: CaenCommand, msg: &Message) -> Option<Outcome> {
        Some(match cmd {
            CaenCommand::Refresh => {
                self.plant.mark_all_dirty();
                Ok(())
            }
            CaenCommand::Clear => {
                let pv = pv::clear_alarm(&self.plant.prefix);
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
            } => self.setv(side, &channel, volts).await,
            CaenCommand::Switch { side, on, channel } => {
                return self.switch(side, on, channel.as_deref(), msg).await;
            }
            CaenCommand::Reload => self.reload(),
            CaenCommand::Reconnect => {
                if !self.sequences.is_empty() {
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

    async fn setv(&mut self, side: Side, channel: &str, volts: f64) -> Outcome {
        let targets = self.targets(Some(channel))?;
        let ci = targets[0];
        self.check_free(&targets)?;
        let cfg = &self.plant.channels[ci].cfg;
        let limit = match side {
            Side::Lv => cfg.lv.limit_v,
            Side::Hv => cfg.hv.limit_v,
        }
        .unwrap_or(0.0);
        if !(0.0..=limit).contains(&volts) {
            return Err(format!(
                "{} V is outside the {} limits of channel {channel}: 0 .. {limit} V",
                command::show_number(volts),
                side.as_str().to_uppercase()
            ));
        }
        self.check_connected(&targets)?;
        let pv = self.plant.pv(ci, side, Param::V0Set);
        let failed = self.put_many(vec![(ci, pv, PutValue::Number(volts))]).await;
        if failed.is_empty() {
            self.plant.channels[ci].set_v_override[side as usize] = Some(volts);
            Ok(())
        } else {
            Err(self.describe_failures(&failed))
        }
    }

    async fn switch(
        &mut self,
        side: Side,
        on: bool,
        channel: Option<&str>,
        msg: &Message,
    ) -> Option<Outcome> {
        let targets = match self.targets(channel) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        if targets.is_empty() {
            return Some(Err("no channel has a module: nothing to switch".into()));
        }
        if let Err(e) = self
            .check_free(&targets)
            .and_then(|_| self.check_connected(&targets))
        {
            return Some(Err(e));
        }
        let word = if on { "On" } else { "Off" };
        match (side, on) {
            (Side::Hv, true) => {
                let lv_off: Vec<&str> = targets
                    .iter()
                    .map(|c| &self.plant.channels[*c])
                    .filter(|c| !c.is_on(Side::Lv) || c.state == ChannelState::Error)
                    .map(|c| c.cfg.id.as_str())
                    .collect();
                if !lv_off.is_empty() {
                    return Some(Err(format!(
                        "HV on refused: LV is not on (or in error) on channel(s) {}; switch LV \
                         on first. Nothing was changed",
                        lv_off.join(", ")
                    )));
                }
            }
            (Side::Lv, false) => return self.lv_off(targets, msg).await,
            (Side::Lv, true) => {
                if let Err(e) = self.permit.check_lv_on(UtcNanos::now()) {
                    return Some(Err(e));
                }
            }
            _ => {}
        }
        let writes = targets
            .iter()
            .map(|c| {
                (
                    *c,
                    self.plant.pv(*c, side, Param::Pw),
                    PutValue::Label(word.into()),
                )
            })
            .collect();
        let failed = self.put_many(writes).await;
        Some(if failed.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} {} failed on {} (the other channels were switched)",
                side.as_str().to_uppercase(),
                word.to_lowercase(),
                self.describe_failures(&failed)
            ))
        })
    }

    fn hv_is_down(&self, ci: usize) -> bool {
        let ch = &self.plant.channels[ci];
        !ch.is_on(Side::Hv)
            && ch
                .value(Side::Hv, Param::VMon)
                .is_some_and(|v| v.abs() < self.cfg.safety.hv_safe_voltage)
    }

    /// LV off: channels whose HV is down go off now; the others get HV off first and
    /// wait in a [`Sequence`].
    async fn lv_off(&mut self, targets: Vec<usize>, msg: &Message) -> Option<Outcome> {
        let (now, wait): (Vec<usize>, Vec<usize>) =
            targets.into_iter().partition(|c| self.hv_is_down(*c));
        let mut failed = Vec::new();
        if !wait.is_empty() {
            let writes = wait
                .iter()
                .filter(|c| self.plant.channels[**c].is_on(Side::Hv))
                .map(|c| {
                    (
                        *c,
                        self.plant.pv(*c, Side::Hv, Param::Pw),
                        PutValue::Label("Off".into()),
                    )
                })
                .collect();
            failed.extend(self.put_many(writes).await);
        }
        let writes = now
            .iter()
            .map(|c| {
                (
                    *c,
                    self.plant.pv(*c, Side::Lv, Param::Pw),
                    PutValue::Label("Off".into()),
                )
            })
            .collect();
        failed.extend(self.put_many(writes).await);
        let failed_text: Vec<String> = failed
            .iter()
            .map(|(ci, e)| format!("channel {}: {e}", self.plant.channels[*ci].cfg.id))
            .collect();
        let waiting: Vec<usize> = wait
            .into_iter()
            .filter(|c| !failed.iter().any(|(f, _)| f == c))
            .collect();
        if waiting.is_empty() {
            return Some(if failed_text.is_empty() {
                Ok(())
            } else {
                Err(format!("LV off failed on {}", failed_text.join("; ")))
            });
        }
        tracing::info!(
            channels = ?waiting.iter().map(|c| &self.plant.channels[*c].cfg.id).collect::<Vec<_>>(),
            safe_v = self.cfg.safety.hv_safe_voltage,
            "LV off: HV switched off first, waiting for it to ramp down"
        );
        self.sequences.push(Sequence {
            command: msg.clone(),
            waiting,
            done: now
                .iter()
                .map(|c| self.plant.channels[*c].cfg.id.clone())
                .collect(),
            failed: failed_text,
            deadline: Instant::now() + timeout(self.cfg.safety.hv_off_timeout_secs),
        });
        None
    }

    /// Moves LV-off sequences on; returns the finished ones with their outcome.
    pub async fn progress(&mut self, now: Instant) -> Vec<(Message, Outcome)> {
        let mut finished = Vec::new();
        let mut i = 0;
        while i < self.sequences.len() {
            let ready: Vec<usize> = self.sequences[i]
                .waiting
                .iter()
                .copied()
                .filter(|c| self.hv_is_down(*c))
                .collect();
            if !ready.is_empty() {
                let writes = ready
                    .iter()
                    .map(|c| {
                        (
                            *c,
                            self.plant.pv(*c, Side::Lv, Param::Pw),
                            PutValue::Label("Off".into()),
                        )
                    })
                    .collect();
                let failed = self.put_many(writes).await;
                let seq = &mut self.sequences[i];
                seq.waiting.retain(|c| !ready.contains(c));
                for c in ready {
                    let id = self.plant.channels[c].cfg.id.clone();
                    match failed.iter().find(|(f, _)| *f == c) {
                        Some((_, e)) => seq.failed.push(format!("channel {id}: {e}")),
                        None => seq.done.push(id),
                    }
                }
            }
            let seq = &mut self.sequences[i];
            if now >= seq.deadline && !seq.waiting.is_empty() {
                for c in std::mem::take(&mut seq.waiting) {
                    let ch = &self.plant.channels[c];
                    let v = ch
                        .value(Side::Hv, Param::VMon)
                        .map_or("unknown".to_string(), |v| format!("{v:.1} V"));
                    seq.failed.push(format!(
                        "channel {}: HV still at {v} after {} s, LV left on",
                        ch.cfg.id, self.cfg.safety.hv_off_timeout_secs
                    ));
                }
            }
            if self.sequences[i].waiting.is_empty() {
                let seq = self.sequences.remove(i);
                let outcome = if seq.failed.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "LV off failed on {}{}",
                        seq.failed.join("; "),
                        if seq.done.is_empty() {
                            String::new()
                        } else {
                            format!(" (done on {})", seq.done.join(", "))
                        }
                    ))
                };
                finished.push((seq.command, outcome));
            } else {
                i += 1;
            }
        }
        finished
    }

    fn reload(&mut self) -> Outcome {
        let Some(path) = self.config_path.clone() else {
            return Err(
                "this service was not started from a config file: nothing to reload".into(),
            );
        };
        if !self.sequences.is_empty() {
            return Err("an LV switch-off is in progress: reload when it has been answered".into());
        }
        let cfg = dcs_shared::config::load::<CaenConfig>(&path)
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

    /// New plant and watches (reload, reconnect). Set-points given over MQTT survive
    /// for channels that keep their id and supplies.
    fn rebuild(&mut self, cfg: CaenConfig) {
        let old = std::mem::replace(
            &mut self.plant,
            Plant::new(
                &cfg.prefix,
                cfg.resolved(),
                timeout(cfg.ca.connect_timeout_secs),
            ),
        );
        for ch in &mut self.plant.channels {
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
        self.cfg = cfg;
        self.start_watches();
    }

    fn status_json(&self) -> String {
        json!({ "fsm_state": self.state() }).to_string()
    }

    /// Re-derives the states and publishes what changed.
    fn publish(&mut self, session: &Session, force_status: bool) {
        let (_, system_changed) = self.plant.update_states(Instant::now());
        if system_changed {
            tracing::info!(state = self.state(), "system state");
        }
        if system_changed || force_status {
            session.publish_state(&session.topic("status"), self.status_json());
        }
        let name = &self.cfg.name;
        for ci in self.plant.take_dirty() {
            let ch = &self.plant.channels[ci];
            let payload = ch.to_json().to_string();
            // The stream dashboards and telemetry read, plus each channel's last state
            // retained on its own topic for clients that connect later.
            session.publish_state(&format!("{name}/channels/{}", ch.cfg.id), payload.clone());
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

async fn send_reply(session: &Session, msg: &Message, outcome: Outcome, state: &str) {
    let reply = Reply::from_result(&msg.topic, outcome, state);
    if let Err(e) = session.reply(msg, &reply).await {
        tracing::warn!(error = %e, "cannot send reply");
    }
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
    let mut fsm = Fsm::new(cfg, config_path, ca);
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
                    send_reply(&session, &msg, outcome, fsm.state()).await;
                }
            }
            _ = tick.tick() => {
                fsm.publish(&session, false);
                for (msg, outcome) in fsm.progress(Instant::now()).await {
                    send_reply(&session, &msg, outcome, fsm.state()).await;
                }
            }
            _ = refresh_tick.tick(), if refresh > 0.0 => {
                fsm.plant.mark_all_dirty();
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
                        send_reply(&session, &msg, outcome, fsm.state()).await;
                    }
                }
                Some(_) => {}
            },
        }
    }
    for seq in std::mem::take(&mut fsm.sequences) {
        let msg = seq.command;
        send_reply(
            &session,
            &msg,
            Err("the service stopped before HV had ramped down: LV left on".into()),
            fsm.state(),
        )
        .await;
    }
    session.shutdown().await;
    Ok(())
}
