//! Sequence files (`deploy/burnin/*.yaml`): a burn-in described as data, the way a lab
//! writes it down (see `docs/burnin.md`). A sequence is a list of steps; `repeat` nests
//! steps. [`Sequence::flatten`] turns it into the leaves the engine runs one after the
//! other, each with its path (`cycle 7/18, step 3 iv_scan`), so that a checkpoint is
//! one index and a restarted run finds its place again.
//!
//! Voltages are magnitudes, as the CAEN service takes them (`0 .. limitV`); the
//! polarity is the board's.

use std::path::Path;

use dcs_shared::config::{self, ConfigError, Validate};
use serde::{Deserialize, Serialize};

/// What the sequence may ask of the lab (from `burnin.yaml` `limits:`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Coolant set-point range, degC.
    pub temp_min: f64,
    /// Coolant set-point range, degC.
    pub temp_max: f64,
    /// Highest LV set-point, volts.
    pub lv_max_volts: f64,
    /// Highest HV set-point, volts (magnitude).
    pub hv_max_volts: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            temp_min: -40.0,
            temp_max: 40.0,
            lv_max_volts: 15.0,
            hv_max_volts: 800.0,
        }
    }
}

/// A sequence file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sequence {
    /// One line for the panel.
    #[serde(default)]
    pub description: String,
    /// The steps, in order (`- cooling: {...}`: one-key maps, not YAML tags).
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub steps: Vec<Step>,
    /// Checked against these at load (set by [`load`] from `burnin.yaml`).
    #[serde(skip)]
    pub limits: Limits,
}

/// One step. Written as a one-key map: `- cooling: {temp: -35}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Set the coolant and wait until it is stable.
    Cooling(Cooling),
    /// Wait until conditions hold.
    Require(Require),
    /// Switch or set LV.
    Lv(Supply),
    /// Switch or set HV.
    Hv(Supply),
    /// Wait, with every condition still watched.
    Soak(Soak),
    /// A leakage-current scan.
    IvScan(IvScan),
    /// A Ph2_ACF run through ph2acf-bridge.
    Calibration(Calibration),
    /// Steps repeated `count` times.
    Repeat(Repeat),
}

fn tolerance_default() -> f64 {
    1.0
}
fn hold_default() -> f64 {
    60.0
}
fn cooling_timeout_default() -> f64 {
    3600.0
}
fn require_timeout_default() -> f64 {
    1800.0
}
fn supply_timeout_default() -> f64 {
    300.0
}
fn settle_default() -> f64 {
    1.0
}
fn ramp_default() -> f64 {
    10.0
}
fn calibration_timeout_default() -> f64 {
    7200.0
}

/// `cooling:` the coolant set-point, and what "stable" means.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cooling {
    /// Set-point, degC.
    pub temp: f64,
    /// Stable: within this of `temp`, degC.
    #[serde(default = "tolerance_default")]
    pub tolerance: f64,
    /// ... for this long.
    #[serde(default = "hold_default")]
    pub hold_secs: f64,
    /// Not stable after this long: the run fails (a chiller that cannot reach the
    /// temperature needs a person).
    #[serde(default = "cooling_timeout_default")]
    pub timeout_secs: f64,
}

/// `require:` conditions that must hold before going on.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Require {
    /// Every humidity value below this, % RH.
    #[serde(default)]
    pub rh_below: Option<f64>,
    /// Every dew point at least this far below the coolant (the last cooling target and
    /// the measured coolant temperature, whichever is colder), degC.
    #[serde(default)]
    pub dew_margin: Option<f64>,
    /// Not met after this long: the run fails.
    #[serde(default = "require_timeout_default")]
    pub timeout_secs: f64,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// `lv:` / `hv:` switch the run's channels on or off, or set their voltage.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Supply {
    /// `on` or `off`.
    #[serde(default)]
    pub switch: Option<Switch>,
    /// Voltage set-point, volts.
    #[serde(default)]
    pub set: Option<f64>,
    /// Channel ids; default: every channel of the run's modules.
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    /// The confirmed state (every channel on/off, at its voltage) must be seen within.
    #[serde(default = "supply_timeout_default")]
    pub timeout_secs: f64,
}

/// `soak:` a timed wait.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Soak {
    /// How long.
    pub secs: f64,
}

/// One segment of an IV scan: up to `to` by `step`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// End of the segment, volts.
    pub to: f64,
    /// Step, volts (> 0).
    pub step: f64,
}

/// `iv_scan:` a leakage-current scan of every channel of the run (in parallel).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IvScan {
    /// Start (and end) voltage, volts.
    #[serde(default)]
    pub from: f64,
    /// Segments in order: `[{to: 200, step: 10}, {to: 800, step: 20}]`.
    pub segments: Vec<Segment>,
    /// The supply's ramp rate, V/s: how long a step may take to be reached.
    #[serde(default = "ramp_default")]
    pub ramp_rate: f64,
    /// Wait after the voltage is reached before reading the current.
    #[serde(default = "settle_default")]
    pub settle_secs: f64,
    /// A channel whose current reaches this (microamps) stops and ramps down.
    pub compliance_ua: f64,
    /// Channel ids; default: every channel of the run's modules.
    #[serde(default)]
    pub channels: Option<Vec<String>>,
}

impl IvScan {
    /// The voltages of the scan, in order, without the start.
    pub fn points(&self) -> Vec<f64> {
        let mut v = Vec::new();
        let mut at = self.from;
        for s in &self.segments {
            let dir = if s.to >= at { 1.0 } else { -1.0 };
            // Integer stepping: no float drift over 80 steps; a ratio a rounding error
            // off a whole number is that number (2.1 / 0.3 is 7, not 7.000000000000001).
            let ratio = (s.to - at).abs() / s.step;
            let n = if (ratio - ratio.round()).abs() < 1e-9 {
                ratio.round()
            } else {
                ratio.ceil()
            } as usize;
            for i in 1..=n {
                let x = at + dir * s.step * i as f64;
                v.push(if dir * (x - s.to) > 0.0 { s.to } else { x });
            }
            at = s.to;
        }
        v
    }
}

/// `calibration:` a Ph2_ACF run.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Calibration name (ph2acf.yaml `calibrations:`).
    pub calibration: String,
    /// Configuration name (ph2acf.yaml `configs:`).
    pub config: String,
    /// Module names as ph2acf.yaml knows them; default: the run's modules.
    #[serde(default)]
    pub modules: Option<Vec<String>>,
    /// Not finished after this long: stopped, and the run fails.
    #[serde(default = "calibration_timeout_default")]
    pub timeout_secs: f64,
}

/// `repeat:` steps `count` times.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Repeat {
    /// How many times (1..1000).
    pub count: u32,
    /// What to repeat.
    pub steps: Vec<Step>,
}

impl Step {
    /// The step's kind as written in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Cooling(_) => "cooling",
            Step::Require(_) => "require",
            Step::Lv(_) => "lv",
            Step::Hv(_) => "hv",
            Step::Soak(_) => "soak",
            Step::IvScan(_) => "iv_scan",
            Step::Calibration(_) => "calibration",
            Step::Repeat(_) => "repeat",
        }
    }
}

/// A step to run, with where it is in the sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leaf {
    /// `cycle 7/18, step 3 iv_scan`: for people.
    pub path: String,
    /// The step (never a `repeat`).
    pub step: Step,
}

impl Sequence {
    /// The environment inputs its `require` steps read (`humidity`, `dew_point`), with
    /// the key of the first step that reads each.
    pub fn inputs_needed(&self) -> Vec<(&'static str, String)> {
        fn walk(steps: &[Step], at: &str, out: &mut Vec<(&'static str, String)>) {
            for (i, s) in steps.iter().enumerate() {
                match s {
                    Step::Require(r) => {
                        for (name, used, field) in [
                            ("humidity", r.rh_below.is_some(), "rh_below"),
                            ("dew_point", r.dew_margin.is_some(), "dew_margin"),
                        ] {
                            if used && !out.iter().any(|(n, _)| *n == name) {
                                out.push((name, format!("{at}[{i}].require.{field}")));
                            }
                        }
                    }
                    Step::Repeat(r) => walk(&r.steps, &format!("{at}[{i}].repeat.steps"), out),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.steps, "steps", &mut out);
        out
    }

    /// Every step in the order it runs, `repeat`s unrolled.
    pub fn flatten(&self) -> Vec<Leaf> {
        let mut out = Vec::new();
        flatten_into(&self.steps, "", &mut out);
        out
    }
}

fn flatten_into(steps: &[Step], prefix: &str, out: &mut Vec<Leaf>) {
    for (i, s) in steps.iter().enumerate() {
        match s {
            Step::Repeat(r) => {
                for c in 1..=r.count {
                    let p = format!("{prefix}cycle {c}/{}, ", r.count);
                    flatten_into(&r.steps, &p, out);
                }
            }
            other => out.push(Leaf {
                path: format!("{prefix}step {} {}", i + 1, other.kind()),
                step: other.clone(),
            }),
        }
    }
}

/// Longest wait accepted anywhere: a week (a longer soak is a typo).
const MAX_SECS: f64 = 7.0 * 86400.0;
/// Most steps a sequence may unroll to.
const MAX_LEAVES: usize = 100_000;

fn secs(v: f64, zero_ok: bool) -> bool {
    v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) && v <= MAX_SECS
}

impl Validate for Sequence {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.steps.is_empty() {
            return Err(("steps".into(), "no steps: a sequence does something".into()));
        }
        check_steps(&self.steps, "steps", &self.limits)?;
        let n = count_leaves(&self.steps);
        if n > MAX_LEAVES as u64 {
            return Err((
                "steps".into(),
                format!("unrolls to {n} steps (at most {MAX_LEAVES}): check the repeat counts"),
            ));
        }
        Ok(())
    }
}

fn count_leaves(steps: &[Step]) -> u64 {
    steps
        .iter()
        .map(|s| match s {
            Step::Repeat(r) => u64::from(r.count).saturating_mul(count_leaves(&r.steps)),
            _ => 1,
        })
        .fold(0u64, u64::saturating_add)
}

fn check_steps(steps: &[Step], at: &str, lim: &Limits) -> Result<(), (String, String)> {
    for (i, s) in steps.iter().enumerate() {
        let k = |f: &str| format!("{at}[{i}].{}.{f}", s.kind());
        let err = |f: &str, m: String| Err((k(f), m));
        match s {
            Step::Cooling(c) => {
                if !(c.temp.is_finite() && (lim.temp_min..=lim.temp_max).contains(&c.temp)) {
                    return err(
                        "temp",
                        format!(
                            "{} degC is outside the coolant limits {} .. {} degC (burnin.yaml `limits`)",
                            c.temp, lim.temp_min, lim.temp_max
                        ),
                    );
                }
                if !(c.tolerance.is_finite() && c.tolerance > 0.0 && c.tolerance <= 10.0) {
                    return err("tolerance", "must be > 0 and at most 10 degC".into());
                }
                if !secs(c.hold_secs, true) {
                    return err("hold_secs", "must be 0 .. a week".into());
                }
                if !secs(c.timeout_secs, false) || c.timeout_secs <= c.hold_secs {
                    return err(
                        "timeout_secs",
                        "must be longer than hold_secs, and at most a week".into(),
                    );
                }
            }
            Step::Require(r) => {
                if r.rh_below.is_none() && r.dew_margin.is_none() {
                    return Err((
                        format!("{at}[{i}].require"),
                        "requires nothing: give rh_below, dew_margin or both (the interlock \
                         being OK is always required)"
                            .into(),
                    ));
                }
                if let Some(v) = r.rh_below {
                    if !(v.is_finite() && v > 0.0 && v <= 100.0) {
                        return err("rh_below", "must be 0 .. 100 % RH".into());
                    }
                }
                if let Some(v) = r.dew_margin {
                    if !(v.is_finite() && (0.0..=50.0).contains(&v)) {
                        return err("dew_margin", "must be 0 .. 50 degC".into());
                    }
                }
                if !secs(r.timeout_secs, false) {
                    return err("timeout_secs", "must be > 0 and at most a week".into());
                }
            }
            Step::Lv(p) | Step::Hv(p) => {
                let max = if matches!(s, Step::Lv(_)) {
                    lim.lv_max_volts
                } else {
                    lim.hv_max_volts
                };
                match (p.switch, p.set) {
                    (None, None) | (Some(_), Some(_)) => {
                        return Err((
                            format!("{at}[{i}].{}", s.kind()),
                            "give exactly one of `switch: on|off` or `set: VOLTS`".into(),
                        ))
                    }
                    (None, Some(v)) if !(v.is_finite() && (0.0..=max).contains(&v)) => {
                        return err(
                            "set",
                            format!(
                            "{v} V is beyond the channel limit 0 .. {max} V (burnin.yaml `limits`)"
                        ),
                        )
                    }
                    _ => {}
                }
                check_channels(&p.channels).or_else(|m| err("channels", m))?;
                if !secs(p.timeout_secs, false) {
                    return err("timeout_secs", "must be > 0 and at most a week".into());
                }
            }
            Step::Soak(w) => {
                if !secs(w.secs, false) {
                    return err("secs", "must be > 0 and at most a week".into());
                }
            }
            Step::IvScan(v) => {
                let ok = |x: f64| x.is_finite() && (0.0..=lim.hv_max_volts).contains(&x);
                if !ok(v.from) {
                    return err(
                        "from",
                        format!("must be 0 .. {} V (burnin.yaml `limits`)", lim.hv_max_volts),
                    );
                }
                if v.segments.is_empty() {
                    return err(
                        "segments",
                        "no segments: give [{to: V, step: V}, ...]".into(),
                    );
                }
                let mut at = v.from;
                for (j, seg) in v.segments.iter().enumerate() {
                    let kk = |f: &str| k(&format!("segments[{j}].{f}"));
                    if !ok(seg.to) {
                        return Err((
                            kk("to"),
                            format!(
                                "{} V is beyond the channel limit 0 .. {} V (burnin.yaml `limits`)",
                                seg.to, lim.hv_max_volts
                            ),
                        ));
                    }
                    if !(seg.step.is_finite() && seg.step >= 0.1) {
                        return Err((kk("step"), "must be at least 0.1 V".into()));
                    }
                    if (seg.to - at).abs() / seg.step > 2000.0 {
                        return Err((kk("step"), "more than 2000 points in one segment".into()));
                    }
                    at = seg.to;
                }
                if !(v.ramp_rate.is_finite() && v.ramp_rate > 0.0 && v.ramp_rate <= 1000.0) {
                    return err("ramp_rate", "must be > 0 and at most 1000 V/s".into());
                }
                if !secs(v.settle_secs, true) {
                    return err("settle_secs", "must be 0 .. a week".into());
                }
                if !(v.compliance_ua.is_finite() && v.compliance_ua > 0.0) {
                    return err("compliance_ua", "must be > 0 microamps".into());
                }
                check_channels(&v.channels).or_else(|m| err("channels", m))?;
            }
            Step::Calibration(c) => {
                for (f, v) in [("calibration", &c.calibration), ("config", &c.config)] {
                    if v.trim().is_empty() {
                        return err(f, "must name one (see ph2acf.yaml)".into());
                    }
                }
                if c.modules.as_ref().is_some_and(Vec::is_empty) {
                    return err(
                        "modules",
                        "an empty list: leave `modules` out for the run's modules".into(),
                    );
                }
                if !secs(c.timeout_secs, false) {
                    return err("timeout_secs", "must be > 0 and at most a week".into());
                }
            }
            Step::Repeat(r) => {
                if !(1..=1000).contains(&r.count) {
                    return err("count", "must be 1 .. 1000".into());
                }
                if r.steps.is_empty() {
                    return err("steps", "no steps to repeat".into());
                }
                check_steps(&r.steps, &k("steps"), lim)?;
            }
        }
    }
    Ok(())
}

fn check_channels(c: &Option<Vec<String>>) -> Result<(), String> {
    if let Some(c) = c {
        if c.is_empty() {
            return Err("an empty list: leave `channels` out for every channel of the run".into());
        }
        for id in c {
            dcs_shared::topic::check_level(id)?;
        }
    }
    Ok(())
}

/// Loads a sequence file, checked against `limits`; errors name file, line and key.
pub fn load(file: &Path, limits: Limits) -> Result<(Sequence, String), ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        origin: file.to_path_buf(),
        key: None,
        line: None,
        message: format!("cannot read file: {e}"),
    })?;
    parse(&text, file, limits).map(|s| (s, text))
}

/// Parses sequence text (what a checkpoint keeps, so a restart runs what was started
/// even if the file changed since).
pub fn parse(text: &str, origin: &Path, limits: Limits) -> Result<Sequence, ConfigError> {
    // Limits must be known to `validate`, which `from_str` calls: parse without them
    // first (no validation), then check.
    let mut seq: Unchecked = config::from_str(text, origin)?;
    seq.0.limits = limits;
    seq.0.validate().map_err(|(key, message)| ConfigError {
        line: config::key_line(text, &key),
        ..ConfigError::invalid(origin, &key, message)
    })?;
    Ok(seq.0)
}

/// An IV scan on its own (`burnin/cmd/iv_scan`) as a one-step sequence, with its text
/// (what the checkpoint keeps), checked as a sequence file would be; an error names the
/// field of the command (`scan.segments[1].to`).
pub fn iv_scan_alone(scan: IvScan, limits: Limits) -> Result<(Sequence, String), String> {
    let seq = Sequence {
        description: "IV scan (burnin/cmd/iv_scan)".into(),
        steps: vec![Step::IvScan(scan)],
        limits,
    };
    let text = serde_yaml::to_string(&seq).map_err(|e| format!("scan: {e}"))?;
    match parse(&text, Path::new("iv_scan"), limits) {
        Ok(seq) => Ok((seq, text)),
        Err(e) => Err(match e.key {
            Some(k) => format!(
                "`{}`: {}",
                k.replacen("steps[0].iv_scan", "scan", 1),
                e.message
            ),
            None => e.message,
        }),
    }
}

#[derive(Deserialize)]
#[serde(transparent)]
struct Unchecked(Sequence);

impl Validate for Unchecked {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Sequence, ConfigError> {
        parse(text, Path::new("seq.yaml"), Limits::default())
    }

    #[test]
    fn repeats_unroll_with_paths() {
        let s = parse_str(
            r#"
steps:
  - cooling: {temp: 20}
  - repeat:
      count: 2
      steps:
        - cooling: {temp: -35, tolerance: 2}
        - soak: {secs: 10}
  - lv: {switch: "off"}
"#,
        )
        .unwrap();
        let paths: Vec<_> = s.flatten().into_iter().map(|l| l.path).collect();
        assert_eq!(
            paths,
            [
                "step 1 cooling",
                "cycle 1/2, step 1 cooling",
                "cycle 1/2, step 2 soak",
                "cycle 2/2, step 1 cooling",
                "cycle 2/2, step 2 soak",
                "step 3 lv"
            ]
        );
    }

    #[test]
    fn bad_files_name_the_line_and_key() {
        let e = parse_str("steps:\n  - cooling: {temp: 20}\n  - heat: {temp: 30}\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("unknown variant `heat`"), "{e}");

        let e = parse_str("steps:\n  - cooling: {temp: 20\n").unwrap_err();
        assert!(e.line.is_some(), "{e}");

        let e = parse_str(
            "steps:\n  - soak: {secs: 1}\n  - repeat:\n      count: 3\n      steps:\n        - soak: {secs: 5}\n        - cooling: {temp: -80}\n",
        )
        .unwrap_err();
        assert_eq!(
            e.key.as_deref(),
            Some("steps[1].repeat.steps[1].cooling.temp")
        );
        assert_eq!(e.line, Some(7), "{e}");
        assert!(e.message.contains("outside the coolant limits"), "{e}");

        let e = parse_str("steps:\n  - hv: {set: 200}\n  - hv: {set: 900}\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("beyond the channel limit"), "{e}");

        let e = parse_str(
            "steps:\n  - iv_scan:\n      segments: [{to: 200, step: 10}, {to: 1000, step: 20}]\n      compliance_ua: 10\n",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("steps[0].iv_scan.segments[1].to"));
        assert!(e.message.contains("1000 V"), "{e}");

        let e = parse_str("steps:\n  - lv: {switch: on, set: 12}\n").unwrap_err();
        assert!(e.message.contains("exactly one"), "{e}");
    }

    #[test]
    fn iv_points_follow_the_segments() {
        let v = IvScan {
            from: 0.0,
            segments: vec![
                Segment {
                    to: 200.0,
                    step: 10.0,
                },
                Segment {
                    to: 800.0,
                    step: 20.0,
                },
            ],
            ramp_rate: 10.0,
            settle_secs: 1.0,
            compliance_ua: 10.0,
            channels: None,
        };
        let p = v.points();
        assert_eq!(p.len(), 20 + 30);
        assert_eq!(p[0], 10.0);
        assert_eq!(p[19], 200.0);
        assert_eq!(p[20], 220.0);
        assert_eq!(*p.last().unwrap(), 800.0);
        let odd = IvScan {
            segments: vec![Segment {
                to: 25.0,
                step: 10.0,
            }],
            ..v.clone()
        };
        assert_eq!(odd.points(), [10.0, 20.0, 25.0]);
        let fine = IvScan {
            segments: vec![Segment { to: 2.1, step: 0.3 }],
            ..v
        };
        assert_eq!(fine.points().len(), 7, "{:?}", fine.points());
        assert_eq!(*fine.points().last().unwrap(), 2.1);
    }

    #[test]
    fn an_iv_scan_alone_is_a_sequence_that_survives_its_text() {
        let scan = IvScan {
            from: 0.0,
            segments: vec![Segment {
                to: 50.0,
                step: 10.0,
            }],
            ramp_rate: 10.0,
            settle_secs: 1.0,
            compliance_ua: 10.0,
            channels: Some(vec!["1".into()]),
        };
        let (seq, text) = iv_scan_alone(scan.clone(), Limits::default()).unwrap();
        assert_eq!(seq.steps, [Step::IvScan(scan.clone())]);
        assert_eq!(
            parse(&text, Path::new("t"), Limits::default()).unwrap(),
            seq
        );
        let far = IvScan {
            segments: vec![Segment {
                to: 900.0,
                step: 10.0,
            }],
            ..scan
        };
        let e = iv_scan_alone(far, Limits::default()).unwrap_err();
        assert!(
            e.starts_with("`scan.segments[0].to`: 900 V is beyond"),
            "{e}"
        );
    }

    #[test]
    fn shipped_sequences_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/burnin");
        let mut n = 0;
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "yaml") {
                load(&f, Limits::default()).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "the reference and the short sequence");
    }
}
