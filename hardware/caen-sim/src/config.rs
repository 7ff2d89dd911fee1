//! The simulator's configuration: the FSM's own YAML file plus an optional `sim:` section.
//!
//! The file is shared with the `caen` service, whose keys are many: everything this
//! crate does not know (`name`, `global`, `setV`, `module`, ...) is ignored.

use dcs_shared::config::invalid;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::model::Kind;

/// Default PV prefix (the Python original hard-coded it).
pub const DEFAULT_PREFIX: &str = "cleanroom";
/// The standard Channel Access server port.
pub const DEFAULT_CA_PORT: u16 = 5064;
/// Highest board number (`%02d` in PV names).
pub const MAX_BOARD: u32 = 99;
/// Highest channel number (`%03d` in PV names).
pub const MAX_CHAN: u32 = 999;

/// The simulator's view of the CAEN config file (SPEC 4.3) plus its `sim:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    /// PV prefix: PVs are `<prefix>:<bb>:<ccc>:<param>`.
    pub prefix: String,
    /// Module channels by name (`"0"`, `"2"`, ...), each with an LV and/or HV side.
    pub channels: BTreeMap<ChannelKey, ChannelEntry>,
    /// Simulator settings.
    pub sim: SimSection,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            prefix: DEFAULT_PREFIX.into(),
            channels: BTreeMap::new(),
            sim: SimSection::default(),
        }
    }
}

/// A key of the `channels` map. YAML allows both `"0":` and `0:`; both become `"0"`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ChannelKey(pub String);

impl fmt::Display for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ChannelKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = ChannelKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a channel name (string or integer)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ChannelKey, E> {
                Ok(ChannelKey(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ChannelKey, E> {
                Ok(ChannelKey(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ChannelKey, E> {
                Ok(ChannelKey(v.to_string()))
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

/// One module channel: its LV and HV mainframe channels.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelEntry {
    /// Low-voltage side.
    pub lv: Option<Address>,
    /// High-voltage side.
    pub hv: Option<Address>,
}

/// A mainframe channel address. Other keys (`setV`, ...) belong to the FSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Address {
    /// Board (slot) number, 0..=99.
    pub board: u32,
    /// Channel number on the board, 0..=999.
    pub chan: u32,
}

/// The `sim:` section; every key is optional.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SimSection {
    /// CA port for UDP search and TCP; `None`: `EPICS_CA_SERVER_PORT`, else 5064.
    pub port: Option<u16>,
    /// Physics step, ms.
    pub tick_ms: u64,
    /// Amplitude (V) of the jitter added to VMon each tick while a channel is on; 0: none.
    pub noise: f64,
    /// Default LV load, ohms (IMon in A = VMon / R).
    pub lv_load_ohms: f64,
    /// Default HV load, MOhm (IMon in uA = VMon / R).
    pub hv_load_mohms: f64,
    /// The sensor behind each HV channel: leakage at 100 V, uA (0: no sensor), adding
    /// a square-root rise with the bias to the load's current.
    pub hv_leak_ua: f64,
    /// Breakdown voltage per module channel (the key under `channels:`), V: above it
    /// the leakage rises e-fold every 10 V (an IV scan stops there at compliance).
    pub breakdown_volts: BTreeMap<String, f64>,
    /// Where the mainframe state survives restarts; relative to the config file.
    pub state_file: Option<PathBuf>,
}

impl Default for SimSection {
    fn default() -> Self {
        SimSection {
            port: None,
            tick_ms: 50,
            noise: 0.0,
            lv_load_ohms: 10.0,
            hv_load_mohms: 100.0,
            hv_leak_ua: 0.0,
            breakdown_volts: BTreeMap::new(),
            state_file: None,
        }
    }
}

/// One simulated mainframe channel (one side of a module channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideSpec {
    /// LV or HV.
    pub kind: Kind,
    /// Where it sits in the mainframe.
    pub addr: Address,
    /// The module channel (config key) it belongs to.
    pub channel: ChannelKey,
}

impl SimConfig {
    /// Every mainframe channel of the config, in config order (LV before HV).
    pub fn sides(&self) -> Vec<SideSpec> {
        let mut out = Vec::new();
        for (key, entry) in &self.channels {
            for (kind, addr) in [(Kind::Lv, entry.lv), (Kind::Hv, entry.hv)] {
                if let Some(addr) = addr {
                    out.push(SideSpec {
                        kind,
                        addr,
                        channel: key.clone(),
                    });
                }
            }
        }
        out
    }

    /// The CA port: `sim.port`, else `EPICS_CA_SERVER_PORT`, else 5064.
    pub fn port(&self) -> u16 {
        self.sim.port.unwrap_or_else(|| {
            std::env::var("EPICS_CA_SERVER_PORT")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(DEFAULT_CA_PORT)
        })
    }

    /// Makes `sim.state_file` relative to the directory of `config_file`.
    pub fn resolve_paths(&mut self, config_file: &Path) {
        if let Some(p) = &self.sim.state_file {
            self.sim.state_file = Some(dcs_shared::config::relative_to(config_file, p));
        }
    }
}

impl dcs_shared::Validate for SimConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.prefix.is_empty() || self.prefix.chars().any(char::is_whitespace) {
            return invalid("prefix", "must be non-empty, without spaces");
        }
        if self.channels.is_empty() {
            return invalid("channels", "must list at least one channel");
        }
        let mut seen = HashSet::new();
        for (key, entry) in &self.channels {
            if entry.lv.is_none() && entry.hv.is_none() {
                return invalid(format!("channels.{key}"), "needs an `lv` or `hv` address");
            }
            for (side, addr) in [("lv", entry.lv), ("hv", entry.hv)] {
                let Some(addr) = addr else { continue };
                let k = format!("channels.{key}.{side}");
                if addr.board > MAX_BOARD {
                    return invalid(format!("{k}.board"), "must be <= 99");
                }
                if addr.chan > MAX_CHAN {
                    return invalid(format!("{k}.chan"), "must be <= 999");
                }
                if !seen.insert(addr) {
                    return Err((
                        k,
                        format!(
                            "board {} chan {} is used twice in `channels`",
                            addr.board, addr.chan
                        ),
                    ));
                }
            }
        }
        let s = &self.sim;
        if s.tick_ms < 1 {
            return invalid("sim.tick_ms", "must be >= 1");
        }
        if !(s.noise.is_finite() && s.noise >= 0.0) {
            return invalid("sim.noise", "must be a number >= 0");
        }
        if !(s.lv_load_ohms.is_finite() && s.lv_load_ohms > 0.0) {
            return invalid("sim.lv_load_ohms", "must be a number > 0");
        }
        if !(s.hv_load_mohms.is_finite() && s.hv_load_mohms > 0.0) {
            return invalid("sim.hv_load_mohms", "must be a number > 0");
        }
        if !(s.hv_leak_ua.is_finite() && s.hv_leak_ua >= 0.0) {
            return invalid("sim.hv_leak_ua", "must be a number >= 0 (uA at 100 V)");
        }
        for (ch, v) in &s.breakdown_volts {
            if !self.channels.contains_key(&ChannelKey(ch.clone())) {
                return invalid(
                    format!("sim.breakdown_volts.{ch}"),
                    "no such channel under `channels:`",
                );
            }
            if !(v.is_finite() && *v > 0.0) {
                return invalid(format!("sim.breakdown_volts.{ch}"), "must be a voltage > 0");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcs_shared::Validate;

    fn parse(text: &str) -> Result<SimConfig, dcs_shared::ConfigError> {
        dcs_shared::config::from_str(text, Path::new("/etc/dcs/caen.yaml"))
    }

    const FSM_FILE: &str = r#"
name: dcs
prefix: lab
channels:
  "0": {lv: {board: 0, chan: 0, setV: 13.0}, hv: {board: 12, chan: 0}, module: module_0}
  2: {lv: {board: 0, chan: 2}, hv: {board: 12, chan: 2}}
global:
  lv: {setV: 12.0, maxI: 2.5, tripExt: 0b00010001}
  hv: {setV: 200.0, tripMode: Kill, imRange: Low}
sim:
  port: 15064
  state_file: state/caen.json
"#;

    #[test]
    fn parses_the_fsm_file_and_ignores_its_keys() {
        let mut cfg = parse(FSM_FILE).unwrap();
        assert_eq!(cfg.prefix, "lab");
        assert_eq!(cfg.port(), 15064);
        assert_eq!(cfg.sim.tick_ms, 50);
        let sides = cfg.sides();
        assert_eq!(sides.len(), 4);
        assert_eq!(sides[0].kind, Kind::Lv);
        assert_eq!(sides[1].addr, Address { board: 12, chan: 0 });
        assert_eq!(sides[3].channel, ChannelKey("2".into()));
        cfg.resolve_paths(Path::new("/etc/dcs/caen.yaml"));
        assert_eq!(
            cfg.sim.state_file,
            Some(PathBuf::from("/etc/dcs/state/caen.json"))
        );
    }

    #[test]
    fn defaults() {
        let cfg = parse("channels: {\"1\": {hv: {board: 12, chan: 1}}}\n").unwrap();
        assert_eq!(cfg.prefix, DEFAULT_PREFIX);
        assert_eq!(cfg.sim.lv_load_ohms, 10.0);
        assert_eq!(cfg.sim.hv_load_mohms, 100.0);
        assert!(cfg.sim.state_file.is_none());
    }

    #[test]
    fn validation() {
        let bad = |text: &str, key: &str| {
            let e = parse(text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
        };
        bad("prefix: x\n", "channels");
        bad(
            "channels: {\"0\": {lv: {board: 100, chan: 0}}}\n",
            "channels.0.lv.board",
        );
        bad(
            "channels: {\"0\": {hv: {board: 1, chan: 1000}}}\n",
            "channels.0.hv.chan",
        );
        bad(
            "channels: {\"0\": {lv: {board: 1, chan: 1}}, \"1\": {lv: {board: 1, chan: 1}}}\n",
            "channels.1.lv",
        );
        bad("channels: {\"0\": {module: m}}\n", "channels.0");
        let ok = "channels: {\"0\": {lv: {board: 1, chan: 1}}}\n";
        bad(&format!("{ok}sim: {{tick_ms: 0}}\n"), "sim.tick_ms");
        bad(
            &format!("{ok}sim: {{lv_load_ohms: 0}}\n"),
            "sim.lv_load_ohms",
        );
        bad(
            &format!("{ok}sim: {{hv_load_mohms: -1}}\n"),
            "sim.hv_load_mohms",
        );
        bad(&format!("{ok}sim: {{noise: -1}}\n"), "sim.noise");
        assert!(parse(ok).unwrap().validate().is_ok());
    }
}
