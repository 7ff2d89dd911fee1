//! The rules file (YAML): the inputs the interlock watches, the rules over them, and
//! the services it commands. Everything is checked at load; a rule that names an
//! unknown input or lacks its threshold is refused with its key.

use dcs_shared::config::invalid;
use std::collections::BTreeMap;

use dcs_shared::{MqttSettings, Validate};
use serde::{Deserialize, Serialize};

/// Everything `interlock` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterlockConfig {
    /// MQTT name: `<name>/status`, `<name>/permits`, `<name>/online`, `<name>/cmd/...`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Alarms go to `<alarm_prefix>/<rule>` and `<alarm_prefix>/summary`; they are
    /// acknowledged on `<alarm_prefix>/cmd/ack`.
    #[serde(default = "default_alarm_prefix")]
    pub alarm_prefix: String,
    /// The services the interlock commands.
    #[serde(default)]
    pub targets: Targets,
    /// Named values read from MQTT.
    pub inputs: BTreeMap<String, InputConfig>,
    /// The rules, by name (the name is the alarm's topic level).
    pub rules: BTreeMap<String, RuleConfig>,
    /// Evaluation and publication timing.
    #[serde(default)]
    pub timing: Timing,
    /// The longest an operator may shelve an alarm's notifications (`<alarm_prefix>/
    /// cmd/shelve`), in minutes: a shelve always ends by itself (ISA-18.2).
    #[serde(default = "default_shelve_max")]
    pub shelve_max_minutes: f64,
    /// The secret that signs `<name>/permits` (HMAC-SHA256; created, mode 0600, if
    /// missing). Every service that obeys the permit reads the same file. Relative to
    /// this file; the environment variable `DCS_PERMIT_KEY` (the key text) overrides it.
    #[serde(default)]
    pub permit_key_file: Option<std::path::PathBuf>,
    /// Broker settings when run alone (`dcs up` passes the stack's).
    #[serde(default)]
    pub mqtt: MqttSettings,
}

fn default_name() -> String {
    "interlock".into()
}
fn default_alarm_prefix() -> String {
    "alarms".into()
}
fn default_shelve_max() -> f64 {
    24.0 * 60.0
}

/// The services commanded, by their MQTT names, and how fresh their status must be.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Targets {
    /// The CAEN FSM (`dcs`): `<caen>/channels/<id>` is read, `<caen>/cmd/switch/...` sent.
    pub caen: String,
    /// The chiller driver (`julabo`): `<chiller>/status` is read, `<chiller>/cmd/setWT` sent.
    pub chiller: String,
    /// The MARTA CO2 plant driver (`MARTA`), when the lab cools with it:
    /// `<marta>/status` is read, `<marta>/cmd/stop_co2` and
    /// `<marta>/cmd/set_temperature_setpoint` sent by the `marta_*` actions.
    pub marta: Option<String>,
    /// A target status older than this is unknown, hence unsafe. Must exceed the
    /// services' republish periods (CAEN `timing.refresh_secs`, Julabo poll).
    pub max_age_secs: f64,
}

impl Default for Targets {
    fn default() -> Self {
        Targets {
            caen: "dcs".into(),
            chiller: "julabo".into(),
            marta: None,
            max_age_secs: 30.0,
        }
    }
}

pub use dcs_shared::inputs::InputConfig;

/// What a rule checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// `min(cold) - max(dew) >= margin`.
    DewPoint,
    /// `max(inputs) <= limit`.
    OverTemperature,
    /// LV may be on only while `running` is true.
    CoolingRequired,
}

/// How bad a rule's alarm is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth a look.
    Warning,
    /// Hardware at risk.
    #[default]
    Critical,
}

impl Severity {
    /// The name as published.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What the cooling rule does when LV is on without cooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoolingMode {
    /// Refuse LV on (the permit) and raise the alarm; leave what is on alone.
    Refuse,
    /// Also switch HV then LV off.
    SwitchOff,
}

/// One rule. Which keys apply depends on `kind`; a key that does not apply is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// What the rule checks.
    pub kind: RuleKind,
    /// Alarm severity.
    #[serde(default)]
    pub severity: Severity,
    /// `dew_point`: inputs whose lowest value is the coldest surface (chiller bath,
    /// module temperatures).
    #[serde(default)]
    pub cold: Vec<String>,
    /// `dew_point`: inputs whose highest value is the dew point.
    #[serde(default)]
    pub dew: Vec<String>,
    /// `dew_point`: how far above the dew point the coldest surface must stay, degC.
    #[serde(default)]
    pub margin: Option<f64>,
    /// `over_temperature`: the inputs watched.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// `over_temperature`: the highest allowed value.
    #[serde(default)]
    pub limit: Option<f64>,
    /// `cooling_required`: the input saying the chiller circulates (boolean).
    #[serde(default)]
    pub running: Option<String>,
    /// `cooling_required`: refuse LV on only, or also switch off.
    #[serde(default)]
    pub mode: Option<CoolingMode>,
    /// How far back past the threshold a value must come before the condition
    /// counts as normal again (no chatter around the threshold).
    #[serde(default)]
    pub hysteresis: f64,
    /// How long the condition must hold before the alarm is raised.
    #[serde(default)]
    pub hold_secs: f64,
    /// While the condition is not known to be safe, LV on is refused
    /// (`<name>/permits`, read by the CAEN FSM).
    #[serde(default = "yes")]
    pub inhibit_lv: bool,
    /// Actions in order while the alarm's condition persists.
    #[serde(default)]
    pub actions: Vec<ActionStep>,
    /// How long an action may take to show in the target's status before the next
    /// action is taken at once.
    #[serde(default = "default_confirm_timeout")]
    pub confirm_timeout_secs: f64,
    /// What an operator should do, in the alarm (`advice`) and in every notification.
    #[serde(default)]
    pub advice: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_confirm_timeout() -> f64 {
    60.0
}

/// An action of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionStep {
    /// What to do.
    #[serde(rename = "do")]
    pub action: ActionKind,
    /// `chiller_setpoint`, `marta_setpoint`: the temperature, degC (the set-point is
    /// only ever raised).
    #[serde(default)]
    pub temp: Option<f64>,
    /// Seconds after the alarm was raised before this action is due (an earlier
    /// action that failed makes it due at once).
    #[serde(default)]
    pub after_secs: f64,
}

/// The actions the interlock can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// `<caen>/cmd/switch/hv off`.
    HvOff,
    /// `<caen>/cmd/switch/lv off` (the FSM ramps HV down first).
    LvOff,
    /// `<chiller>/cmd/setWT` on the set-point in use.
    ChillerSetpoint,
    /// `<marta>/cmd/set_temperature_setpoint`.
    MartaSetpoint,
    /// `<marta>/cmd/stop_co2`.
    MartaStopCo2,
}

impl ActionKind {
    /// The name as published.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::HvOff => "hv_off",
            ActionKind::LvOff => "lv_off",
            ActionKind::ChillerSetpoint => "chiller_setpoint",
            ActionKind::MartaSetpoint => "marta_setpoint",
            ActionKind::MartaStopCo2 => "marta_stop_co2",
        }
    }
}

/// Evaluation and publication timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Rules are evaluated on every input message and at least this often (ages,
    /// hold times, confirmations).
    pub evaluate_ms: u64,
    /// Latched alarms and the status are republished this often.
    pub republish_secs: f64,
    /// The permit is signed again this often even when unchanged, so that its
    /// readers can tell a live interlock from a stale permit (keep it well below
    /// caen-fsm's `safety.permit_max_age_secs`, 30 s by default).
    pub permit_secs: f64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            evaluate_ms: 250,
            republish_secs: 60.0,
            permit_secs: 10.0,
        }
    }
}

impl RuleConfig {
    /// The actions actually taken: `cooling_required` with `switch_off` means HV then
    /// LV off.
    pub fn effective_actions(&self) -> Vec<ActionStep> {
        if self.kind == RuleKind::CoolingRequired && self.mode == Some(CoolingMode::SwitchOff) {
            [ActionKind::HvOff, ActionKind::LvOff]
                .into_iter()
                .map(|action| ActionStep {
                    action,
                    temp: None,
                    after_secs: 0.0,
                })
                .collect()
        } else {
            self.actions.clone()
        }
    }

    /// Every input the rule reads.
    pub fn input_names(&self) -> impl Iterator<Item = &String> {
        self.cold
            .iter()
            .chain(&self.dew)
            .chain(&self.inputs)
            .chain(self.running.iter())
    }
}

/// Topic levels the interlock uses under the alarm prefix itself.
const RESERVED_RULE_NAMES: &[&str] = &["summary", "reply", "cmd"];

/// The keys of a rule that only some kinds take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuleField {
    Cold,
    Dew,
    Margin,
    Inputs,
    Limit,
    Running,
    Mode,
    Hysteresis,
}

impl RuleField {
    fn key(self) -> &'static str {
        match self {
            RuleField::Cold => "cold",
            RuleField::Dew => "dew",
            RuleField::Margin => "margin",
            RuleField::Inputs => "inputs",
            RuleField::Limit => "limit",
            RuleField::Running => "running",
            RuleField::Mode => "mode",
            RuleField::Hysteresis => "hysteresis",
        }
    }

    fn present(self, r: &RuleConfig) -> bool {
        match self {
            RuleField::Cold => !r.cold.is_empty(),
            RuleField::Dew => !r.dew.is_empty(),
            RuleField::Margin => r.margin.is_some(),
            RuleField::Inputs => !r.inputs.is_empty(),
            RuleField::Limit => r.limit.is_some(),
            RuleField::Running => r.running.is_some(),
            RuleField::Mode => r.mode.is_some(),
            RuleField::Hysteresis => r.hysteresis != 0.0,
        }
    }
}

fn level_ok(s: &str) -> bool {
    dcs_shared::topic::check_level(s).is_ok()
}

fn finite_nonneg(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

/// Longest duration accepted anywhere (a year): beyond, a typo, and an instant that far
/// ahead would overflow.
const MAX_SECS: f64 = 365.0 * 86400.0;

/// A duration in seconds: finite, `> 0` (or `>= 0` when `zero_ok`), at most a year.
fn secs_ok(v: f64, zero_ok: bool) -> bool {
    v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) && v <= MAX_SECS
}

impl InterlockConfig {
    /// Makes relative paths relative to the config file.
    pub fn resolve_paths(&mut self, config_file: &std::path::Path) {
        if let Some(f) = &self.permit_key_file {
            self.permit_key_file = Some(dcs_shared::config::relative_to(config_file, f));
        }
    }
}

impl Validate for InterlockConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        for (key, v) in [("name", &self.name), ("alarm_prefix", &self.alarm_prefix)] {
            if !level_ok(v) {
                return invalid(key, "must be a non-empty MQTT topic level (no / + #)");
            }
        }
        for (key, v) in [
            ("targets.caen", &self.targets.caen),
            ("targets.chiller", &self.targets.chiller),
        ]
        .into_iter()
        .chain(self.targets.marta.as_ref().map(|m| ("targets.marta", m)))
        {
            if !level_ok(v) {
                return invalid(key, "must be a service name (an MQTT topic level)");
            }
        }
        if let Some(m) = &self.targets.marta {
            if *m == self.targets.chiller || *m == self.targets.caen {
                return invalid(
                    "targets.marta",
                    "must name a service of its own, not the chiller's or the CAEN FSM's",
                );
            }
        }
        if !secs_ok(self.targets.max_age_secs, false) {
            return invalid("targets.max_age_secs", "must be > 0 and at most a year");
        }
        if !(self.shelve_max_minutes >= 1.0 && self.shelve_max_minutes <= 7.0 * 24.0 * 60.0) {
            return invalid(
                "shelve_max_minutes",
                "must be 1 .. 10080 (a week): a shelve must end by itself",
            );
        }
        if self.timing.evaluate_ms == 0 || self.timing.evaluate_ms > 10_000 {
            return invalid("timing.evaluate_ms", "must be 1 .. 10000");
        }
        if !(self.timing.permit_secs >= 1.0 && self.timing.permit_secs <= 60.0) {
            return invalid(
                "timing.permit_secs",
                "must be 1 .. 60 (a permit readers see as stale is a refusal)",
            );
        }
        if !(secs_ok(self.timing.republish_secs, false) && self.timing.republish_secs >= 1.0) {
            return invalid("timing.republish_secs", "must be >= 1 and at most a year");
        }
        for (name, input) in &self.inputs {
            input
                .check()
                .or_else(|(f, m)| invalid(format!("inputs.{name}.{f}"), m))?;
        }
        if self.rules.is_empty() {
            return invalid(
                "rules",
                "no rules: an interlock without rules protects nothing",
            );
        }
        for (name, rule) in &self.rules {
            check_rule(name, rule, self)?;
        }
        Ok(())
    }
}

fn check_rule(name: &str, r: &RuleConfig, cfg: &InterlockConfig) -> Result<(), (String, String)> {
    let k = |f: &str| format!("rules.{name}.{f}");
    if !level_ok(name) || RESERVED_RULE_NAMES.contains(&name) {
        return Err((
            format!("rules.{name}"),
            format!(
                "a rule name is an MQTT topic level (no / + #) and not one of {}",
                RESERVED_RULE_NAMES.join(", ")
            ),
        ));
    }
    // Keys that belong to other kinds are refused: a `limit` on a dew-point rule is a
    // mistake that would otherwise be silently ignored.
    use RuleField as F;
    let (needs, forbids): (&[RuleField], &[RuleField]) = match r.kind {
        RuleKind::DewPoint => (
            &[F::Cold, F::Dew, F::Margin],
            &[F::Inputs, F::Limit, F::Running, F::Mode],
        ),
        RuleKind::OverTemperature => (
            &[F::Inputs, F::Limit],
            &[F::Cold, F::Dew, F::Margin, F::Running, F::Mode],
        ),
        RuleKind::CoolingRequired => (
            &[F::Running, F::Mode],
            &[
                F::Cold,
                F::Dew,
                F::Margin,
                F::Inputs,
                F::Limit,
                F::Hysteresis,
            ],
        ),
    };
    let kind = format!("{:?}", r.kind);
    for f in needs {
        if !f.present(r) {
            return Err((k(f.key()), format!("required for kind {}", snake(&kind))));
        }
    }
    for f in forbids {
        if f.present(r) {
            return Err((
                k(f.key()),
                format!("does not apply to kind {}", snake(&kind)),
            ));
        }
    }
    for (key, input) in r
        .cold
        .iter()
        .map(|i| ("cold", i))
        .chain(r.dew.iter().map(|i| ("dew", i)))
        .chain(r.inputs.iter().map(|i| ("inputs", i)))
        .chain(r.running.iter().map(|i| ("running", i)))
    {
        if !cfg.inputs.contains_key(input) {
            return Err((
                k(key),
                format!(
                    "no input named `{input}` (inputs: {})",
                    cfg.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    for (key, v) in [("margin", r.margin), ("limit", r.limit)] {
        if v.is_some_and(|v| !v.is_finite()) {
            return invalid(k(key), "must be a finite number");
        }
    }
    if !finite_nonneg(r.hysteresis) {
        return invalid(k("hysteresis"), "must be >= 0");
    }
    if !secs_ok(r.hold_secs, true) {
        return invalid(k("hold_secs"), "must be 0 .. one year");
    }
    if !secs_ok(r.confirm_timeout_secs, false) {
        return invalid(k("confirm_timeout_secs"), "must be > 0 and at most a year");
    }
    if r.kind == RuleKind::CoolingRequired && !r.actions.is_empty() {
        return invalid(
            k("actions"),
            "cooling_required takes `mode: refuse` or `mode: switch_off` (HV then LV off), not actions",
        );
    }
    let mut last_after = 0.0;
    for (i, a) in r.actions.iter().enumerate() {
        let ka = |f: &str| format!("rules.{name}.actions[{i}].{f}");
        if !secs_ok(a.after_secs, true) {
            return invalid(ka("after_secs"), "must be 0 .. one year");
        }
        if a.after_secs < last_after {
            return invalid(
                ka("after_secs"),
                "actions are taken in order: after_secs must not decrease",
            );
        }
        last_after = a.after_secs;
        let setpoint = matches!(
            a.action,
            ActionKind::ChillerSetpoint | ActionKind::MartaSetpoint
        );
        match (setpoint, a.temp) {
            (true, None) => {
                return invalid(ka("temp"), format!("required for {}", a.action.as_str()))
            }
            (true, Some(t)) if !t.is_finite() => {
                return invalid(ka("temp"), "must be a finite number")
            }
            (false, Some(_)) => {
                return invalid(
                    ka("temp"),
                    "only chiller_setpoint and marta_setpoint take a temperature",
                )
            }
            _ => {}
        }
        if matches!(
            a.action,
            ActionKind::MartaSetpoint | ActionKind::MartaStopCo2
        ) && cfg.targets.marta.is_none()
        {
            return invalid(
                ka("do"),
                format!(
                    "{} needs `targets.marta` (the MARTA driver's name)",
                    a.action.as_str()
                ),
            );
        }
    }
    Ok(())
}

fn snake(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const GOOD: &str = r#"
inputs:
  bath: {topic: julabo/status, field: internal_temp, max_age_secs: 30}
  running: {topic: julabo/status, field: running, max_age_secs: 30}
  dew: {topic: "+/sensors/BME/dew", max_age_secs: 60}
rules:
  dew_point:
    kind: dew_point
    cold: [bath]
    dew: [dew]
    margin: 3
    hysteresis: 1
    actions:
      - {do: chiller_setpoint, temp: 20}
      - {do: hv_off, after_secs: 30}
      - {do: lv_off, after_secs: 30}
  cooling: {kind: cooling_required, running: running, mode: switch_off}
"#;

    fn parse(text: &str) -> Result<InterlockConfig, String> {
        dcs_shared::config::from_str::<InterlockConfig>(text, Path::new("interlock.yaml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_file_loads_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.name, "interlock");
        assert_eq!(c.alarm_prefix, "alarms");
        assert_eq!(c.targets.caen, "dcs");
        let cooling = &c.rules["cooling"];
        assert!(cooling.inhibit_lv);
        let actions: Vec<_> = cooling
            .effective_actions()
            .iter()
            .map(|a| a.action)
            .collect();
        assert_eq!(actions, [ActionKind::HvOff, ActionKind::LvOff]);
    }

    #[test]
    fn mistakes_are_refused_with_their_key() {
        let cases = [
            (
                GOOD.replace("cold: [bath]", "cold: [bathh]"),
                "rules.dew_point.cold",
                "no input named `bathh`",
            ),
            (
                GOOD.replace("    margin: 3\n", ""),
                "rules.dew_point.margin",
                "required for kind dew_point",
            ),
            (
                GOOD.replace("margin: 3", "margin: 3\n    limit: 40"),
                "rules.dew_point.limit",
                "does not apply",
            ),
            (
                GOOD.replace("max_age_secs: 60", "max_age_secs: 0"),
                "inputs.dew.max_age_secs",
                "must be > 0",
            ),
            (
                GOOD.replace("after_secs: 30}", "after_secs: 1e30}"),
                "rules.dew_point.actions[1].after_secs",
                "one year",
            ),
            (
                GOOD.replace(
                    "{do: hv_off, after_secs: 30}",
                    "{do: hv_off, after_secs: 10, temp: 3}",
                ),
                "rules.dew_point.actions[1].temp",
                "only chiller_setpoint and marta_setpoint",
            ),
            (
                GOOD.replace(
                    "{do: lv_off, after_secs: 30}",
                    "{do: lv_off, after_secs: 5}",
                ),
                "rules.dew_point.actions[2].after_secs",
                "must not decrease",
            ),
            (
                GOOD.replace("{do: chiller_setpoint, temp: 20}", "{do: chiller_setpoint}"),
                "rules.dew_point.actions[0].temp",
                "required",
            ),
            (
                GOOD.replace("cooling: {", "summary: {"),
                "rules.summary",
                "not one of",
            ),
            (
                GOOD.replace("mode: switch_off", "mode: off"),
                "rules.cooling.mode",
                "unknown variant",
            ),
            (
                GOOD.replace("+/sensors/BME/dew", "ESP+/sensors"),
                "inputs.dew.topic",
                "whole level",
            ),
            (
                GOOD.replace("{do: hv_off", "{do: hv_of"),
                "rules.dew_point.actions[1].do",
                "unknown variant",
            ),
            (
                GOOD.replace(
                    "{do: hv_off, after_secs: 30}",
                    "{do: marta_stop_co2, after_secs: 30}",
                ),
                "rules.dew_point.actions[1].do",
                "needs `targets.marta`",
            ),
            (
                format!("targets: {{marta: julabo}}\n{GOOD}"),
                "targets.marta",
                "a service of its own",
            ),
            (
                GOOD.replace(
                    "{do: hv_off, after_secs: 30}",
                    "{do: marta_setpoint, after_secs: 30}",
                ),
                "rules.dew_point.actions[1].temp",
                "required for marta_setpoint",
            ),
        ];
        for (text, key, msg) in cases {
            let e = parse(&text).expect_err(key);
            assert!(e.contains(key) && e.contains(msg), "{key}: {e}");
        }
    }
}
