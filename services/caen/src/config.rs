//! The FSM's configuration (YAML, SPEC 4.3: same shape as the Python original).
//!
//! Global `lv`/`hv` values apply to every channel, per-channel values override them, and
//! everything given is written to the PVs when a channel connects. A parameter given
//! nowhere is left as the hardware has it. `limitV`/`limitI` bound what any set-point
//! (config or MQTT) may be.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dcs_shared::{MqttSettings, Validate};
use serde::{Deserialize, Deserializer};

/// Everything `caen-fsm` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaenConfig {
    /// MQTT name: topics are `<name>/status`, `<name>/channels`, `<name>/cmd/...`.
    #[serde(default = "default_name")]
    pub name: String,
    /// PV prefix: `<prefix>:<board %02d>:<chan %03d>:<param>`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Channels by id (the id is a topic level in `<name>/cmd/switch/lv/<id>`).
    pub channels: BTreeMap<String, ChannelConfig>,
    /// Values applied to every channel unless the channel overrides them.
    #[serde(default)]
    pub global: Global,
    /// Channel Access settings.
    #[serde(default)]
    pub ca: CaSettings,
    /// HV/LV sequencing.
    #[serde(default)]
    pub safety: Safety,
    /// Publication timing.
    #[serde(default)]
    pub timing: Timing,
    /// Broker settings when run alone (`dcs up` passes the stack's).
    #[serde(default)]
    pub mqtt: MqttSettings,
    /// How `caen-sim` serves this crate of channels; ignored by the FSM.
    #[serde(default)]
    pub sim: serde_yaml::Value,
}

fn default_name() -> String {
    "dcs".into()
}
fn default_prefix() -> String {
    "cleanroom".into()
}

/// One module's supplies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Low-voltage channel.
    pub lv: LvChannel,
    /// High-voltage channel.
    pub hv: HvChannel,
    /// The module powered by it. Without one the channel is monitored, not commanded.
    #[serde(default)]
    pub module: Option<String>,
}

/// Board and channel of the LV supply, with overrides of the global values.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LvChannel {
    /// Board (slot) number.
    pub board: u8,
    /// Channel on the board.
    pub chan: u16,
    /// Parameters overriding `global.lv`.
    #[serde(flatten)]
    pub params: LvParams,
}

/// Board and channel of the HV supply, with overrides of the global values.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HvChannel {
    /// Board (slot) number.
    pub board: u8,
    /// Channel on the board.
    pub chan: u16,
    /// Parameters overriding `global.hv`.
    #[serde(flatten)]
    pub params: HvParams,
}

/// Global parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Global {
    /// LV parameters of every channel.
    #[serde(default)]
    pub lv: LvParams,
    /// HV parameters of every channel.
    #[serde(default)]
    pub hv: HvParams,
}

/// LV parameters, names as in the Python config. Volts, amperes, seconds.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LvParams {
    /// `V0Set`.
    #[serde(rename = "setV")]
    pub set_v: Option<f64>,
    /// `I0Set`.
    pub max_i: Option<f64>,
    /// `OVVThr`.
    #[serde(rename = "ovVThr")]
    pub ov_v_thr: Option<f64>,
    /// `UNVThr`.
    #[serde(rename = "unVThr")]
    pub un_v_thr: Option<f64>,
    /// `Trip`.
    pub trip_time: Option<f64>,
    /// `TripInt` (bit mask; `0b...`/`0x...` strings accepted).
    #[serde(default, deserialize_with = "int_like")]
    pub trip_int: Option<i64>,
    /// `TripExt`.
    #[serde(default, deserialize_with = "int_like")]
    pub trip_ext: Option<i64>,
    /// `RUpTime`.
    pub ramp_up_time: Option<f64>,
    /// `RDwTime`.
    pub ramp_dwn_time: Option<f64>,
    /// Highest `setV` accepted (config or command). Default 16 V.
    #[serde(rename = "limitV")]
    pub limit_v: Option<f64>,
    /// Highest `maxI` accepted. Default 10 A.
    #[serde(rename = "limitI")]
    pub limit_i: Option<f64>,
}

/// HV parameters, names as in the Python config. Volts, microamperes, V/s, seconds.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HvParams {
    /// `V0Set`.
    #[serde(rename = "setV")]
    pub set_v: Option<f64>,
    /// `I0Set`.
    pub max_i: Option<f64>,
    /// `RUp`.
    pub ramp_up_speed: Option<f64>,
    /// `RDWn`.
    pub ramp_dwn_speed: Option<f64>,
    /// `Trip`.
    pub trip_time: Option<f64>,
    /// `TripInt`.
    #[serde(default, deserialize_with = "int_like")]
    pub trip_int: Option<i64>,
    /// `TripExt`.
    #[serde(default, deserialize_with = "int_like")]
    pub trip_ext: Option<i64>,
    /// `PDwn`: what a trip or switch-off does.
    pub trip_mode: Option<TripMode>,
    /// `ImRange`.
    pub im_range: Option<ImRange>,
    /// Highest `setV` accepted. Default 1000 V.
    #[serde(rename = "limitV")]
    pub limit_v: Option<f64>,
    /// Highest `maxI` accepted. Default 3500 uA (the High range).
    #[serde(rename = "limitI")]
    pub limit_i: Option<f64>,
}

/// `PDwn` enum of an HV channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TripMode {
    /// Off at once.
    Kill,
    /// Ramp down at `RDWn`.
    Ramp,
}

/// `ImRange` enum of an HV channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ImRange {
    /// 350 uA full scale.
    Low,
    /// 3.5 mA full scale.
    High,
}

impl TripMode {
    /// The PV's enum string.
    pub fn label(self) -> &'static str {
        match self {
            TripMode::Kill => "Kill",
            TripMode::Ramp => "Ramp",
        }
    }
}

impl ImRange {
    /// The PV's enum string.
    pub fn label(self) -> &'static str {
        match self {
            ImRange::Low => "Low",
            ImRange::High => "High",
        }
    }
}

/// Integers written as numbers or as `"0b0001"`, `"0x11"`, `"17"`.
fn int_like<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Text(String),
    }
    let Some(raw) = Option::<Raw>::deserialize(d)? else {
        return Ok(None);
    };
    match raw {
        Raw::Int(i) => Ok(Some(i)),
        Raw::Text(t) => parse_int(&t).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{t}` is not an integer (write 17, \"0b00010001\" or \"0x11\")"
            ))
        }),
    }
}

fn parse_int(t: &str) -> Option<i64> {
    let t = t.trim().replace('_', "");
    if let Some(b) = t.strip_prefix("0b").or_else(|| t.strip_prefix("0B")) {
        i64::from_str_radix(b, 2).ok()
    } else if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()
    } else {
        t.parse().ok()
    }
}

/// Where the IOC is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaSettings {
    /// Search addresses (`host` or `host:port`, space or comma separated). Empty: the
    /// standard EPICS environment decides (`EPICS_CA_ADDR_LIST`,
    /// `EPICS_CA_AUTO_ADDR_LIST`, `EPICS_CA_NAME_SERVERS`, `EPICS_CA_SERVER_PORT`).
    /// Non-empty: replaces the address list, auto list included.
    pub addr_list: String,
    /// CA write timeout, seconds.
    #[serde(default = "put_timeout")]
    pub put_timeout_secs: f64,
    /// A channel not connected this long after start is reported DISCONNECTED.
    #[serde(default = "connect_timeout")]
    pub connect_timeout_secs: f64,
}

impl Default for CaSettings {
    fn default() -> Self {
        CaSettings {
            addr_list: String::new(),
            put_timeout_secs: put_timeout(),
            connect_timeout_secs: connect_timeout(),
        }
    }
}

fn put_timeout() -> f64 {
    3.0
}
fn connect_timeout() -> f64 {
    5.0
}

impl CaSettings {
    /// The configured search addresses; the port defaults to `EPICS_CA_SERVER_PORT` or 5064.
    pub fn addresses(&self, default_port: u16) -> Result<Vec<std::net::SocketAddr>, String> {
        use std::net::ToSocketAddrs;
        let mut out = Vec::new();
        for item in self
            .addr_list
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
        {
            let with_port = if item.contains(':') {
                item.to_string()
            } else {
                format!("{item}:{default_port}")
            };
            let addr = with_port
                .to_socket_addrs()
                .map_err(|e| format!("`{item}`: {e}"))?
                .find(|a| a.is_ipv4())
                .ok_or_else(|| format!("`{item}` has no IPv4 address"))?;
            out.push(addr);
        }
        Ok(out)
    }
}

/// HV/LV sequencing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Safety {
    /// LV is switched off only once the HV `VMon` is below this, volts.
    pub hv_safe_voltage: f64,
    /// How long an LV-off waits for the HV to ramp down before giving up (LV left on).
    pub hv_off_timeout_secs: f64,
    /// The interlock's MQTT name: LV on is refused unless `<interlock>/permits` allows
    /// it. Unset: no interlock is consulted.
    pub interlock: Option<String>,
    /// The key the interlock signs its permits with (the interlock's
    /// `permit_key_file`), relative to this file; `$DCS_PERMIT_KEY` (the key text)
    /// overrides it. Required with `interlock`: an unsigned permit is refused.
    pub permit_key_file: Option<PathBuf>,
    /// A permit older than this is a refusal (the interlock signs it again every
    /// `timing.permit_secs`, 10 s by default).
    pub permit_max_age_secs: f64,
}

impl Default for Safety {
    fn default() -> Self {
        Safety {
            hv_safe_voltage: 5.0,
            hv_off_timeout_secs: 120.0,
            interlock: None,
            permit_key_file: None,
            permit_max_age_secs: 30.0,
        }
    }
}

/// Publication timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Everything is republished this often even without change (0: never).
    pub refresh_secs: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { refresh_secs: 10.0 }
    }
}

/// Default limits when neither the channel nor `global` gives one.
pub const LV_LIMIT_V: f64 = 16.0;
/// See [`LV_LIMIT_V`].
pub const LV_LIMIT_I: f64 = 10.0;
/// See [`LV_LIMIT_V`].
pub const HV_LIMIT_V: f64 = 1000.0;
/// See [`LV_LIMIT_V`].
pub const HV_LIMIT_I: f64 = 3500.0;

/// One channel with global values merged in.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Channel id.
    pub id: String,
    /// Module name; `None` means monitored only.
    pub module: Option<String>,
    /// LV board.
    pub lv_board: u8,
    /// LV channel.
    pub lv_chan: u16,
    /// HV board.
    pub hv_board: u8,
    /// HV channel.
    pub hv_chan: u16,
    /// LV parameters after merging (limits always set).
    pub lv: LvParams,
    /// HV parameters after merging (limits always set).
    pub hv: HvParams,
}

impl Resolved {
    /// Whether the channel takes commands and counts for the system state.
    pub fn active(&self) -> bool {
        self.module.is_some()
    }
}

macro_rules! merge {
    ($over:expr, $base:expr, $($f:ident),*) => {{
        let (o, b) = (&$over, &$base);
        let mut m = o.clone();
        $( if m.$f.is_none() { m.$f = b.$f.clone(); } )*
        m
    }};
}

impl CaenConfig {
    /// Channels with global values merged in, in id order.
    pub fn resolved(&self) -> Vec<Resolved> {
        self.channels
            .iter()
            .map(|(id, c)| {
                let mut lv = merge!(
                    c.lv.params,
                    self.global.lv,
                    set_v,
                    max_i,
                    ov_v_thr,
                    un_v_thr,
                    trip_time,
                    trip_int,
                    trip_ext,
                    ramp_up_time,
                    ramp_dwn_time,
                    limit_v,
                    limit_i
                );
                lv.limit_v.get_or_insert(LV_LIMIT_V);
                lv.limit_i.get_or_insert(LV_LIMIT_I);
                let mut hv = merge!(
                    c.hv.params,
                    self.global.hv,
                    set_v,
                    max_i,
                    ramp_up_speed,
                    ramp_dwn_speed,
                    trip_time,
                    trip_int,
                    trip_ext,
                    trip_mode,
                    im_range,
                    limit_v,
                    limit_i
                );
                hv.limit_v.get_or_insert(HV_LIMIT_V);
                hv.limit_i.get_or_insert(HV_LIMIT_I);
                Resolved {
                    id: id.clone(),
                    module: c.module.clone(),
                    lv_board: c.lv.board,
                    lv_chan: c.lv.chan,
                    hv_board: c.hv.board,
                    hv_chan: c.hv.chan,
                    lv,
                    hv,
                }
            })
            .collect()
    }
}

fn non_negative(key: &str, v: Option<f64>) -> Result<(), (String, String)> {
    match v {
        Some(x) if !x.is_finite() || x < 0.0 => Err((key.into(), format!("{x} must be >= 0"))),
        _ => Ok(()),
    }
}

fn within(
    key: &str,
    v: Option<f64>,
    limit: Option<f64>,
    what: &str,
) -> Result<(), (String, String)> {
    match (v, limit) {
        (Some(x), Some(l)) if x > l => Err((
            key.into(),
            format!("{x} is above the {what} limit {l} (raise limit{what} if this is intended)"),
        )),
        _ => Ok(()),
    }
}

impl Validate for CaenConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        check_topic_level("name", &self.name)?;
        if self.prefix.is_empty() || self.prefix.contains(|c: char| c.is_whitespace()) {
            return Err((
                "prefix".into(),
                "must be a non-empty PV prefix without spaces".into(),
            ));
        }
        if self.channels.is_empty() {
            return Err(("channels".into(), "lists no channel".into()));
        }
        if let Err(e) = self.ca.addresses(5064) {
            return Err(("ca.addr_list".into(), e));
        }
        for (key, ok) in [
            ("ca.put_timeout_secs", self.ca.put_timeout_secs > 0.0),
            (
                "ca.connect_timeout_secs",
                self.ca.connect_timeout_secs > 0.0,
            ),
            (
                "safety.hv_off_timeout_secs",
                self.safety.hv_off_timeout_secs > 0.0,
            ),
        ] {
            if !ok {
                return Err((key.into(), "must be > 0".into()));
            }
        }
        // NaN is refused too.
        if self.safety.hv_safe_voltage.is_nan() || self.safety.hv_safe_voltage < 0.0 {
            return Err(("safety.hv_safe_voltage".into(), "must be >= 0".into()));
        }
        if !(self.timing.refresh_secs >= 0.0 && self.timing.refresh_secs.is_finite()) {
            return Err(("timing.refresh_secs".into(), "must be >= 0".into()));
        }
        if self.safety.interlock.is_some()
            && self.safety.permit_key_file.is_none()
            && std::env::var_os(dcs_shared::permit::KEY_ENV).is_none()
        {
            return Err((
                "safety.interlock".into(),
                format!(
                    "needs safety.permit_key_file (the key the interlock signs its permits \
                     with, its permit_key_file) or ${}",
                    dcs_shared::permit::KEY_ENV
                ),
            ));
        }
        if !(self.safety.permit_max_age_secs >= 1.0 && self.safety.permit_max_age_secs <= 3600.0) {
            return Err((
                "safety.permit_max_age_secs".into(),
                "must be 1 .. 3600".into(),
            ));
        }
        let mut used = BTreeMap::new();
        for r in self.resolved() {
            let at = |k: &str| format!("channels.{}.{k}", r.id);
            check_topic_level(&at("id"), &r.id)?;
            if r.lv_board > 99 || r.hv_board > 99 || r.lv_chan > 999 || r.hv_chan > 999 {
                return Err((
                    at("board"),
                    "boards go to 99 and channels to 999 (PV names %02d:%03d)".into(),
                ));
            }
            for (side, b, c) in [("lv", r.lv_board, r.lv_chan), ("hv", r.hv_board, r.hv_chan)] {
                if let Some(other) = used.insert((b, c), r.id.clone()) {
                    return Err((
                        at(side),
                        format!("board {b} channel {c} is already used by channel `{other}`"),
                    ));
                }
            }
            let lv = &r.lv;
            for (k, v) in [
                ("lv.setV", lv.set_v),
                ("lv.maxI", lv.max_i),
                ("lv.ovVThr", lv.ov_v_thr),
                ("lv.unVThr", lv.un_v_thr),
                ("lv.tripTime", lv.trip_time),
                ("lv.rampUpTime", lv.ramp_up_time),
                ("lv.rampDwnTime", lv.ramp_dwn_time),
                ("lv.limitV", lv.limit_v),
                ("lv.limitI", lv.limit_i),
            ] {
                non_negative(&at(k), v)?;
            }
            let hv = &r.hv;
            for (k, v) in [
                ("hv.setV", hv.set_v),
                ("hv.maxI", hv.max_i),
                ("hv.rampUpSpeed", hv.ramp_up_speed),
                ("hv.rampDwnSpeed", hv.ramp_dwn_speed),
                ("hv.tripTime", hv.trip_time),
                ("hv.limitV", hv.limit_v),
                ("hv.limitI", hv.limit_i),
            ] {
                non_negative(&at(k), v)?;
            }
            within(&at("lv.setV"), lv.set_v, lv.limit_v, "V")?;
            within(&at("lv.maxI"), lv.max_i, lv.limit_i, "I")?;
            within(&at("hv.setV"), hv.set_v, hv.limit_v, "V")?;
            within(&at("hv.maxI"), hv.max_i, hv.limit_i, "I")?;
        }
        Ok(())
    }
}

fn check_topic_level(key: &str, s: &str) -> Result<(), (String, String)> {
    dcs_shared::topic::check_level(s).map_err(|m| (key.to_string(), m))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name: dcs
prefix: cleanroom
channels:
  "0": {lv: {board: 0, chan: 0, setV: 13.0}, hv: {board: 12, chan: 0}, module: module_0}
  "2": {lv: {board: 0, chan: 2}, hv: {board: 12, chan: 2}}
global:
  lv: {setV: 12.0, maxI: 2.5, ovVThr: 15.0, unVThr: 0.0, tripTime: 10.0, tripInt: 0b0,
       tripExt: 0b00010001, rampUpTime: 100.0, rampDwnTime: 100.0}
  hv: {setV: 200.0, maxI: 500.0, rampUpSpeed: 50.0, rampDwnSpeed: 50.0, tripTime: 10.0,
       tripInt: 0b0, tripExt: 0b00010001, tripMode: Kill, imRange: Low}
"#;

    fn parse(y: &str) -> Result<CaenConfig, String> {
        dcs_shared::config::from_str::<CaenConfig>(y, std::path::Path::new("caen.yaml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_spec_example_loads_and_merges() {
        let c = parse(SPEC).unwrap();
        let r = c.resolved();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].lv.set_v, Some(13.0), "channel overrides global");
        assert_eq!(r[1].lv.set_v, Some(12.0));
        assert_eq!(r[0].lv.trip_ext, Some(0b0001_0001));
        assert_eq!(r[0].hv.trip_mode, Some(TripMode::Kill));
        assert_eq!(r[0].hv.limit_v, Some(HV_LIMIT_V));
        assert!(r[0].active() && !r[1].active());
    }

    #[test]
    fn integers_in_any_base() {
        assert_eq!(parse_int("0b00010001"), Some(17));
        assert_eq!(parse_int("0x11"), Some(17));
        assert_eq!(parse_int("17"), Some(17));
        assert_eq!(parse_int("0b2"), None);
        let e = parse(&SPEC.replace(
            "tripInt: 0b0,\n       tripExt",
            "tripInt: 0bx,\n       tripExt",
        ))
        .unwrap_err();
        assert!(e.contains("0bx"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&SPEC.replace("setV: 13.0", "setV: 30.0")).unwrap_err();
        assert!(
            e.contains("channels.0.lv.setV") && e.contains("limit"),
            "{e}"
        );
        let e = parse(&SPEC.replace("hv: {board: 12, chan: 2}", "hv: {board: 12, chan: 0}"))
            .unwrap_err();
        assert!(e.contains("already used by channel `0`"), "{e}");
        let e = parse(&SPEC.replace("\"2\":", "\"a/b\":")).unwrap_err();
        assert!(e.contains("topic level"), "{e}");
        let e = parse(&SPEC.replace("tripMode: Kill", "tripMode: Slow")).unwrap_err();
        assert!(e.contains("Slow"), "{e}");
        let e = parse(&SPEC.replace("maxI: 2.5", "maxI: -1")).unwrap_err();
        assert!(e.contains("lv.maxI"), "{e}");
        let e = parse(&SPEC.replace("module: module_0", "modul: module_0")).unwrap_err();
        assert!(e.contains("modul"), "{e}");
    }

    #[test]
    fn address_list() {
        let ca = CaSettings {
            addr_list: "127.0.0.1, 10.0.0.1:5070".into(),
            ..Default::default()
        };
        let a = ca.addresses(15064).unwrap();
        assert_eq!(a[0].to_string(), "127.0.0.1:15064");
        assert_eq!(a[1].to_string(), "10.0.0.1:5070");
    }
}
