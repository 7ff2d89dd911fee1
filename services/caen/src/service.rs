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
    /// The task writing each channel's settings.
    settings_tasks: HashMap<usize, tokio::task::AbortHandle>,
    /// Settings writes that completed: (channel, generation).
    written_tx: mpsc::UnboundedSender<(usize, u64)>,
    written_rx: mpsc::UnboundedReceiver<(usize, u64)>,
    generation: u64,
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
        // `permit_key_file` was made relative to the config file when it was loaded
        // (`program::load`): resolving it again here would point elsewhere.
        let permit = Permit::new(
            cfg.safety.interlock.as_deref(),
            cfg.safety.permit_key_file.clone(),
            cfg.safety.permit_max_age_secs,
        );
        let plant = Plant::new(
            &cfg.prefix,
            cfg.resolved(),
            timeout(cfg.ca.connect_timeout_secs),
        );
        let (written_tx, written_rx) = mpsc::unbounded_channel();
        let mut svc = Service {
            control: Control::new(plant, cfg.safety.clone()),
            settings_tasks: HashMap::new(),
            written_tx,
            written_rx,
            generation: 0,
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
            // Numbered across reloads too, so a write task of an older connection can
            // never vouch for this one.
            self.generation += 1;
            let ch = &mut self.control.plant.channels[ci];
            ch.generation = self.generation;
            ch.settings_written = false;
            self.write_settings(ci);
        }
    }

    /// Takes in the settings writes that completed (see [`Service::write_settings`]).
    pub fn settings_done(&mut self, ci: usize, generation: u64) {
        if let Some(ch) = self.control.plant.channels.get_mut(ci) {
            if ch.generation == generation {
                ch.settings_written = true;
            }
        }
    }

    /// Settings writes completed and not yet taken in.
    pub fn take_settings_done(&mut self) {
        while let Ok((ci, g)) = self.written_rx.try_recv() {
            self.settings_done(ci, g);
        }
    }

    /// Writes the configured settings of an active channel, one after the other in
    /// the plan's order (after load, reload and every reconnect: an IOC restarted
    /// without autosave forgets them). The channel takes no switch-on until they
    /// have been read back (see [`control`]).
    fn write_settings(&mut self, ci: usize) {
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
        let (done, generation) = (self.written_tx.clone(), ch.generation);
        let task = tokio::spawn(async move {
            // Until every write went through: a channel that looks connected may not take
            // writes yet (a hung IOC coming back). A newer connection aborts this task.
            let mut backoff =
                dcs_shared::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
            loop {
                let mut failed = Vec::new();
                for (pv, v) in &writes {
                    if let Err(e) = ca.put(pv, v.clone(), t).await {
                        failed.push(e.to_string());
                    }
                }
                if failed.is_empty() {
                    tracing::info!(channel = %id, written = writes.len(), "settings written");
                    let _ = done.send((ci, generation));
                    return;
                }
                let retry_in = backoff.next_delay();
                tracing::warn!(channel = %id, failed = failed.len(), first = %failed[0], ?retry_in,
                    "settings not all written: the channel takes no switch-on until they are");
                tokio::time::sleep(retry_in).await;
            }
        });
        if let Some(old) = self.settings_tasks.insert(ci, task.abort_handle()) {
            old.abort();
        }
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
                for (i, limit) in [ch.cfg.lv.limit_v, ch.cfg.hv.limit_v]
                    .into_iter()
                    .enumerate()
                {
                    match o.set_v_override[i] {
                        Some(v) if (0.0..=limit.unwrap_or(0.0)).contains(&v) => {
                            ch.set_v_override[i] = Some(v);
                        }
                        Some(v) => tracing::warn!(channel = %ch.cfg.id, volts = v,
                            "set-point given over MQTT is outside the reloaded limits: the file's is used"),
                        None => {}
                    }
                }
            }
        }
        for (_, t) in self.settings_tasks.drain() {
            t.abort();
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
    let mut svc = Service::new(cfg, config_path, ca);
    let mut options =
        SessionOptions::new(&name).subscribe(&format!("{name}/cmd/#"), QoS::AtLeastOnce);
    for f in svc.permit.filters() {
        options = options.subscribe(&f, QoS::AtLeastOnce);
    }
    let (session, mut mqtt_events) = Session::start(&mqtt, options)?;
    svc.publish(&session, true);

    // Time-driven changes: the connection timeout and the LV-off deadline.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh_tick =
        tokio::time::interval(timeout(if refresh > 0.0 { refresh } else { 3600.0 }));
    refresh_tick.tick().await;
    loop {
        let settle_at = svc.settle_at();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = svc.events_rx.recv() => {
                let Some(ev) = ev else { break };
                svc.apply(&ev);
                // Take what else is queued, then publish once: a burst of monitor
                // updates becomes one message per channel.
                for _ in 0..10_000 {
                    match svc.events_rx.try_recv() {
                        Ok(ev) => svc.apply(&ev),
                        Err(_) => break,
                    }
                }
                svc.publish(&session, false);
                for (msg, outcome) in svc.progress(Instant::now()).await {
                    svc.publish(&session, false);
                    session.answer(&msg, outcome, svc.state()).await;
                }
            }
            _ = tick.tick() => {
                svc.publish(&session, false);
                for (msg, outcome) in svc.progress(Instant::now()).await {
                    session.answer(&msg, outcome, svc.state()).await;
                }
            }
            _ = sleep_until_opt(settle_at) => svc.publish(&session, false),
            Some((ci, generation)) = svc.written_rx.recv() => {
                svc.settings_done(ci, generation);
                svc.publish(&session, false);
            }
            _ = refresh_tick.tick(), if refresh > 0.0 => {
                svc.control.plant.mark_all_dirty();
                svc.shown_channels.iter_mut().for_each(String::clear);
                svc.publish(&session, true);
            }
            ev = mqtt_events.recv() => match ev {
                None => break,
                Some(SessionEvent::Message(msg)) => {
                    if svc.permit.ingest(&msg.topic, &msg.payload, UtcNanos::now()) {
                        continue;
                    }
                    let Some(parsed) = command::parse::<CaenCommand>(&name, &msg) else { continue };
                    let outcome = match parsed {
                        Err(e) => Some(Err(e.to_string())),
                        Ok(cmd) => {
                            let force = matches!(cmd, CaenCommand::Refresh);
                            let out = svc.execute(cmd, &msg).await;
                            svc.publish(&session, force);
                            out
                        }
                    };
                    if let Some(outcome) = outcome {
                        session.answer(&msg, outcome, svc.state()).await;
                    }
                }
                Some(_) => {}
            },
        }
    }
    for req in svc.control.abort_sequences() {
        let Some(msg) = svc.pending.remove(&req) else {
            continue;
        };
        session
            .answer(
                &msg,
                Err("the service stopped before HV had ramped down: LV left on".into()),
                svc.state(),
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::ca::PutError;

    /// A stand-in for the mainframe behind [`ChannelAccess`], for unit tests of this
    /// loop: it records every write; the test plays the monitor events. (A fake: the
    /// integration tests run the real CA client against caen-sim and caproto.)
    #[derive(Default)]
    struct FakeCa {
        puts: Mutex<Vec<(String, PutValue)>>,
    }

    impl ChannelAccess for FakeCa {
        fn watch(
            &self,
            _slot: usize,
            _pv: &str,
            _deadband: f64,
            _events: mpsc::UnboundedSender<CaEvent>,
        ) -> Watch {
            Watch::new(tokio::spawn(async {}))
        }

        fn put(
            &self,
            pv: &str,
            value: PutValue,
            _timeout: Duration,
        ) -> impl std::future::Future<Output = Result<(), PutError>> + Send {
            if let Ok(mut p) = self.puts.lock() {
                p.push((pv.to_string(), value));
            }
            async { Ok(()) }
        }
    }

    fn config() -> CaenConfig {
        let y = "name: dcs\nprefix: t\nchannels:\n  \"0\": {lv: {board: 0, chan: 0}, hv: {board: 12, chan: 0}, module: m0}\n\
                 global:\n  lv: {setV: 12.0, maxI: 2.5, tripExt: 17, rampUpTime: 1.0}\n  hv: {setV: 100.0, tripMode: Kill}\n";
        dcs_shared::config::from_str(y, std::path::Path::new("caen.yaml")).unwrap()
    }

    fn msg(topic: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Default::default(),
            retain: false,
            response_topic: None,
            correlation_data: None,
            ack: None,
        }
    }

    fn value(svc: &mut Service<FakeCa>, pv: &str, v: &PutValue) {
        let slot = svc.plant().slots.iter().position(|s| s.pv == pv).unwrap();
        let (value, label) = match v {
            PutValue::Number(n) => (*n, None),
            PutValue::Label(l) => (0.0, Some(l.clone())),
        };
        svc.apply(&CaEvent::Value { slot, value, label });
    }

    #[tokio::test]
    async fn settings_go_out_in_plan_order_and_gate_the_switch_on() {
        let ca = Arc::new(FakeCa::default());
        let mut svc = Service::new(config(), None, ca.clone());
        let n = svc.plant().slots.len();
        for slot in 0..n {
            svc.apply(&CaEvent::Connected { slot });
        }
        for pv in ["t:00:000:Status", "t:12:000:Status"] {
            value(&mut svc, pv, &PutValue::Number(0.0));
        }
        svc.control.plant.update_states(Instant::now());
        assert_eq!(svc.plant().channels[0].state.as_str(), "CONNECTED");
        let switch = CaenCommand::Switch {
            side: Side::Lv,
            on: true,
            channel: None,
        };
        let out = svc.execute(switch.clone(), &msg("dcs/cmd/switch/lv")).await;
        let Some(Err(e)) = out else { panic!("{out:?}") };
        assert!(e.contains("settings not confirmed"), "{e}");
        // The settings task has run by now (current-thread runtime, one await above).
        for _ in 0..100 {
            if ca.puts.lock().unwrap().len() >= 7 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let puts = ca.puts.lock().unwrap().clone();
        let plan: Vec<String> = control::settings(&svc.plant().channels[0], 0)
            .iter()
            .map(|w| svc.plant().pv(0, w.side, w.param))
            .collect();
        assert_eq!(
            puts.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
            plan,
            "settings in the plan's order, nothing else"
        );
        assert_eq!(plan.last().map(String::as_str), Some("t:12:000:V0Set"));
        // Written and read back: now the switch-on goes out.
        for (pv, v) in &puts {
            value(&mut svc, pv, v);
        }
        svc.control.plant.update_states(Instant::now());
        assert_eq!(
            svc.plant().channels[0].state.as_str(),
            "CONNECTED",
            "read back, but the writes not yet known to be done"
        );
        svc.take_settings_done();
        svc.control.plant.update_states(Instant::now());
        assert_eq!(svc.plant().channels[0].state.as_str(), "LV_OFF");
        let out = svc.execute(switch, &msg("dcs/cmd/switch/lv")).await;
        assert_eq!(out, Some(Ok(())));
        assert_eq!(
            ca.puts.lock().unwrap().last(),
            Some(&("t:00:000:Pw".to_string(), PutValue::Label("On".into())))
        );
    }

    #[tokio::test]
    async fn an_lv_off_with_hv_on_is_answered_when_hv_is_down() {
        let ca = Arc::new(FakeCa::default());
        let mut svc = Service::new(config(), None, ca.clone());
        for slot in 0..svc.plant().slots.len() {
            svc.apply(&CaEvent::Connected { slot });
        }
        for w in control::settings(&svc.plant().channels[0].clone(), 0) {
            let pv = svc.plant().pv(0, w.side, w.param);
            value(&mut svc, &pv, &w.value);
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
            svc.take_settings_done();
        }
        value(&mut svc, "t:00:000:Status", &PutValue::Number(1.0));
        value(&mut svc, "t:12:000:Status", &PutValue::Number(1.0));
        value(&mut svc, "t:12:000:VMon", &PutValue::Number(100.0));
        svc.control.plant.update_states(Instant::now());
        let off = CaenCommand::Switch {
            side: Side::Lv,
            on: false,
            channel: None,
        };
        let m = msg("dcs/cmd/switch/lv");
        assert_eq!(svc.execute(off, &m).await, None, "answered later");
        assert_eq!(
            ca.puts.lock().unwrap().last(),
            Some(&("t:12:000:Pw".to_string(), PutValue::Label("Off".into())))
        );
        assert!(svc.progress(Instant::now()).await.is_empty());
        value(&mut svc, "t:12:000:Status", &PutValue::Number(0.0));
        value(&mut svc, "t:12:000:VMon", &PutValue::Number(0.5));
        let done = svc.progress(Instant::now()).await;
        assert_eq!(done, vec![(m, Ok(()))]);
        assert_eq!(
            ca.puts.lock().unwrap().last(),
            Some(&("t:00:000:Pw".to_string(), PutValue::Label("Off".into())))
        );
    }
}
