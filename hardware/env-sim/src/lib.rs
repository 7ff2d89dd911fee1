//! `env-sim`: the lab's environmental boards (ESP/Arduino) as MQTT publishers, SPEC
//! 3.3: `<board>/sensors/BME/{temp,humi,dew}` and `<board>/sensors/SCD30/co2`, bare
//! numbers, every `interval_secs`. The dew point follows from temperature and humidity
//! (Magnus formula), as the boards compute it.
//!
//! Fault injection over MQTT (one reply each on `<name>/reply`):
//! `<name>/cmd/set` `{"board": "ESP01", "temp": 24.0, "humi": 80.0}` changes a board's
//! air; `<name>/cmd/silence` `{"board": "ESP01"}` stops it publishing (a dead board);
//! `<name>/cmd/resume` `{"board": "ESP01"}` starts it again.

use dcs_shared::config::invalid;
use std::collections::BTreeMap;
use std::time::Duration;

use dcs_shared::command::{self, Command, CommandError};
use dcs_shared::shutdown::CancellationToken;
use dcs_shared::{MqttSettings, QoS, Session, SessionEvent, SessionOptions, Validate};
use rand::Rng;
use serde::Deserialize;

/// The simulator's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvSimConfig {
    /// MQTT name (`<name>/cmd/...`, `<name>/online`).
    #[serde(default = "default_name")]
    pub name: String,
    /// Board names, the first topic level.
    pub boards: Vec<String>,
    /// Publication period.
    #[serde(default = "one")]
    pub interval_secs: f64,
    /// Air temperature, degC.
    #[serde(default = "default_temp")]
    pub temp: f64,
    /// Relative humidity, %.
    #[serde(default = "default_humi")]
    pub humi: f64,
    /// Noise amplitude on temperature (degC) and humidity (%).
    #[serde(default = "default_noise")]
    pub noise: f64,
    /// Broker settings when run alone (`dcs up` passes the stack's).
    #[serde(default)]
    pub mqtt: MqttSettings,
}

fn default_name() -> String {
    "env-sim".into()
}
fn one() -> f64 {
    1.0
}
fn default_temp() -> f64 {
    21.0
}
fn default_humi() -> f64 {
    40.0
}
fn default_noise() -> f64 {
    0.05
}

impl Validate for EnvSimConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.boards.is_empty() {
            return invalid("boards", "at least one board");
        }
        for b in &self.boards {
            dcs_shared::topic::check_level(b).map_err(|m| ("boards".to_string(), m))?;
        }
        if !(self.interval_secs.is_finite() && (0.001..=86400.0).contains(&self.interval_secs)) {
            return invalid("interval_secs", "must be 0.001 .. 86400");
        }
        if !(0.0..=100.0).contains(&self.humi) {
            return invalid("humi", "must be 0 .. 100 %");
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return invalid("noise", "must be >= 0");
        }
        Ok(())
    }
}

/// Dew point (degC) from temperature (degC) and relative humidity (%), Magnus formula
/// with the Sensirion constants (good to 0.35 degC from -45 to 60 degC).
pub fn dew_point(temp: f64, humi: f64) -> f64 {
    const B: f64 = 17.62;
    const C: f64 = 243.12;
    let g = (humi.max(0.1) / 100.0).ln() + B * temp / (C + temp);
    C * g / (B - g)
}

#[derive(Debug, Clone)]
struct Board {
    temp: f64,
    humi: f64,
    silent: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPayload {
    board: String,
    #[serde(default)]
    temp: Option<f64>,
    #[serde(default)]
    humi: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BoardPayload {
    board: String,
}

enum SimCommand {
    Set(SetPayload),
    Silence(String),
    Resume(String),
}

impl Command for SimCommand {
    fn parse(path: &[&str], payload: &[u8]) -> Result<Self, CommandError> {
        match path {
            ["set"] => {
                let p: SetPayload = command::json(payload)?;
                if p.temp.is_some_and(|t| !(-60.0..=100.0).contains(&t)) {
                    return Err(CommandError::new("temp must be -60 .. 100 degC"));
                }
                if p.humi.is_some_and(|h| !(0.0..=100.0).contains(&h)) {
                    return Err(CommandError::new("humi must be 0 .. 100 %"));
                }
                Ok(SimCommand::Set(p))
            }
            ["silence"] => Ok(SimCommand::Silence(
                command::json::<BoardPayload>(payload)?.board,
            )),
            ["resume"] => Ok(SimCommand::Resume(
                command::json::<BoardPayload>(payload)?.board,
            )),
            [other, ..] => Err(CommandError::new(format!(
                "unknown command `{}`: set, silence or resume",
                command::truncate(other, 40)
            ))),
            [] => Err(CommandError::new("no command")),
        }
    }
}

/// Runs until `shutdown`.
pub async fn run(
    cfg: EnvSimConfig,
    mqtt: MqttSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = cfg.name.clone();
    let options = SessionOptions::new(&name).subscribe(&format!("{name}/cmd/#"), QoS::AtLeastOnce);
    let (session, mut events) = Session::start(&mqtt, options)?;
    let mut boards: BTreeMap<String, Board> = cfg
        .boards
        .iter()
        .map(|b| {
            (
                b.clone(),
                Board {
                    temp: cfg.temp,
                    humi: cfg.humi,
                    silent: false,
                },
            )
        })
        .collect();
    tracing::info!(
        boards = boards.len(),
        interval_secs = cfg.interval_secs,
        "env-sim publishing"
    );
    let mut tick = tokio::time::interval(Duration::from_secs_f64(cfg.interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dropped = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Like a real board, nothing is sent while the broker is away (the session
            // says so); what is dropped while connected is a full queue.
            _ = tick.tick(), if session.is_connected() => {
                let mut rng = rand::thread_rng();
                for (b, s) in boards.iter().filter(|(_, s)| !s.silent) {
                    let temp = s.temp + rng.gen_range(-1.0..=1.0) * cfg.noise;
                    let humi = (s.humi + rng.gen_range(-1.0..=1.0) * cfg.noise).clamp(0.0, 100.0);
                    let co2 = 420.0 + rng.gen_range(0.0..30.0);
                    for (q, v) in [
                        ("BME/temp", temp),
                        ("BME/humi", humi),
                        ("BME/dew", dew_point(temp, humi)),
                        ("SCD30/co2", co2),
                    ] {
                        if !session.try_publish(&format!("{b}/sensors/{q}"), format!("{v:.2}"), QoS::AtMostOnce, false) {
                            dropped += 1;
                            if dropped.is_power_of_two() {
                                tracing::warn!(dropped, "sensor values dropped (request queue full)");
                            }
                        }
                    }
                }
            }
            ev = events.recv() => match ev {
                None => break,
                Some(SessionEvent::Message(msg)) => {
                    let Some(parsed) = command::parse::<SimCommand>(&name, &msg) else { continue };
                    let result = parsed.map_err(|e| e.to_string()).and_then(|c| {
                        let board = match &c {
                            SimCommand::Set(p) => &p.board,
                            SimCommand::Silence(b) | SimCommand::Resume(b) => b,
                        };
                        let s = boards.get_mut(board).ok_or_else(|| format!(
                            "no board `{}` (boards: {})",
                            command::truncate(board, 40),
                            cfg.boards.join(", ")
                        ))?;
                        match c {
                            SimCommand::Set(p) => {
                                s.temp = p.temp.unwrap_or(s.temp);
                                s.humi = p.humi.unwrap_or(s.humi);
                            }
                            SimCommand::Silence(_) => s.silent = true,
                            SimCommand::Resume(_) => s.silent = false,
                        }
                        Ok(())
                    });
                    session.answer(&msg, result, "RUNNING").await;
                }
                Some(_) => {}
            },
        }
    }
    session.shutdown().await;
    Ok(())
}

/// The `env-sim` program (see [`dcs_shared::program`]).
pub struct EnvSim;

impl dcs_shared::program::Program for EnvSim {
    const NAME: &'static str = "env-sim";
    const ABOUT: &'static str = "Simulated environmental sensor boards publishing on MQTT.";
    type Config = EnvSimConfig;

    fn mqtt(cfg: &mut EnvSimConfig) -> Option<&mut MqttSettings> {
        Some(&mut cfg.mqtt)
    }
    fn client_id(cfg: &EnvSimConfig) -> Option<String> {
        Some(cfg.name.clone())
    }
    fn summary(cfg: &EnvSimConfig) -> String {
        format!("({} boards)", cfg.boards.len())
    }
    async fn run(
        cfg: EnvSimConfig,
        _file: std::path::PathBuf,
        mqtt: MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        run(cfg, mqtt, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dew_point_matches_reference_values() {
        // Reference: Sensirion application note, and the 100 % identity.
        assert!(
            (dew_point(21.0, 40.0) - 6.9).abs() < 0.1,
            "{}",
            dew_point(21.0, 40.0)
        );
        assert!((dew_point(25.0, 100.0) - 25.0).abs() < 1e-9);
        assert!((dew_point(20.0, 50.0) - 9.3).abs() < 0.1);
    }
}
