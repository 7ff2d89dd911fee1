//! The MARTA register map (SPEC 10; `deploy/marta-registers.yaml`, the format of
//! `marta/registers.yaml` beside the SPEC) and everything about registers that needs no
//! I/O: which spans one poll reads, how a float32 sits in two registers, what the
//! alarm words and the control word say. The simulator uses the same map.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

/// The most registers one Modbus read may ask for (the protocol's limit).
pub const MAX_READ: u16 = 125;

/// How a value is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    /// Two registers, IEEE 754 single precision, in the map's word order.
    Float32,
    /// One register, unsigned.
    Uint16,
    /// One register, two's complement.
    Int16,
    /// One bit of a register (`bit`).
    Bool,
}

impl ValueType {
    /// Registers taken.
    pub fn width(self) -> u16 {
        match self {
            ValueType::Float32 => 2,
            _ => 1,
        }
    }
}

/// Which of a float32's two registers holds the low 16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// The first register holds the low word (MARTA's PLC).
    #[default]
    LowFirst,
    /// The first register holds the high word (Modbus convention elsewhere).
    HighFirst,
}

/// A reading published in `MARTA/status`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    /// Key in the status JSON (kept from the Python driver).
    pub name: String,
    /// First register.
    pub register: u16,
    /// Storage.
    #[serde(rename = "type")]
    pub kind: ValueType,
    /// A change smaller than this alone does not publish the status again.
    #[serde(default)]
    pub deadband: f64,
}

/// A register the driver writes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlEntry {
    /// `set_start_chiller`, ... (the names the driver looks for).
    pub name: String,
    /// Register.
    pub register: u16,
    /// `bool` (one bit of a control word) or `float32` (a set-point).
    #[serde(rename = "type")]
    pub kind: ValueType,
    /// For `bool`: 0..15.
    #[serde(default)]
    pub bit: Option<u8>,
}

/// The plant's status word.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusEntry {
    /// Name (informative).
    pub name: String,
    /// Register.
    pub register: u16,
    /// Must be `uint16`.
    #[serde(rename = "type")]
    pub kind: ValueType,
}

/// How bad an alarm bit is, as the map says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// A warning: the plant keeps running.
    Warning,
    /// Not documented in the Python driver: treated as a fault until known better.
    Unknown,
    /// A fault: the plant stops.
    Error,
}

/// One alarm bit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmBit {
    /// PLC tag, e.g. `EB_FS`.
    pub name: String,
    /// Alarm word.
    pub register: u16,
    /// 0..15.
    pub bit: u8,
    /// How bad.
    pub severity: Severity,
    /// What it means, for people (empty when the Python driver did not say).
    #[serde(default)]
    pub meaning: String,
}

/// The register map file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapFile {
    /// What the map is for (informative).
    #[serde(default)]
    pub device: String,
    /// The shared map's description of the float32 layout; its word order is taken
    /// from it unless `word_order` is given.
    #[serde(default)]
    pub float32: Option<String>,
    /// Word order of float32 values.
    #[serde(default)]
    pub word_order: Option<WordOrder>,
    /// Published readings.
    pub readings: Vec<Reading>,
    /// Written registers.
    pub controls: Vec<ControlEntry>,
    /// The status word.
    pub status: StatusEntry,
    /// Alarm bits.
    pub alarm_bits: Vec<AlarmBit>,
}

/// One bit of a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bit {
    /// Register.
    pub register: u16,
    /// 0..15.
    pub bit: u8,
}

impl Bit {
    /// The bit as a mask of its register.
    pub fn mask(self) -> u16 {
        1 << self.bit
    }
}

/// The control registers the driver needs, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Controls {
    /// `set_start_chiller`.
    pub start_chiller: Bit,
    /// `set_start_co2`.
    pub start_co2: Bit,
    /// `set_flow_active`.
    pub flow_active: Bit,
    /// `set_alarm_reset`.
    pub alarm_reset: Bit,
    /// `set_temperature_setpoint` (float32).
    pub temperature_setpoint: u16,
    /// `set_speed_setpoint` (float32).
    pub speed_setpoint: u16,
    /// `set_flow_setpoint` (float32).
    pub flow_setpoint: u16,
}

/// A run of contiguous registers read with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First register.
    pub start: u16,
    /// How many.
    pub count: u16,
}

impl Span {
    /// One past the last register.
    pub fn end(self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }
}

/// A checked register map.
#[derive(Debug, Clone)]
pub struct RegisterMap {
    /// Published readings, in the map's order.
    pub readings: Vec<Reading>,
    /// Control registers by role.
    pub controls: Controls,
    /// The status word's register.
    pub status: u16,
    /// Alarm bits, in the map's order.
    pub alarms: Vec<AlarmBit>,
    /// Float32 word order.
    pub word_order: WordOrder,
    /// What one poll reads: every reading, the alarm words, the control words and the
    /// status word, in as few requests as contiguity allows.
    pub spans: Vec<Span>,
}

impl dcs_shared::Validate for MapFile {
    fn validate(&self) -> Result<(), (String, String)> {
        self.clone().check().map(|_| ())
    }
}

impl MapFile {
    /// Checks the map: `Err((key, message))` names what is wrong.
    pub fn check(self) -> Result<RegisterMap, (String, String)> {
        let e = |k: String, m: String| Err((k, m));
        let word_order = match (self.word_order, &self.float32) {
            (Some(w), _) => w,
            (None, None) => WordOrder::LowFirst,
            (None, Some(note)) => {
                let note = note.to_ascii_lowercase();
                if note.contains("low word first") {
                    WordOrder::LowFirst
                } else if note.contains("high word first") {
                    WordOrder::HighFirst
                } else {
                    return e(
                        "float32".into(),
                        "does not say `low word first` or `high word first`: add `word_order: low_first` or `high_first`".into(),
                    );
                }
            }
        };
        // register -> who uses it, to find overlaps.
        let mut used: BTreeMap<u16, String> = BTreeMap::new();
        // `key` is where the error points, `who` what the other user is called.
        let mut claim =
            |key: String, who: String, start: u16, width: u16| -> Result<(), (String, String)> {
                for r in 0..width {
                    let Some(reg) = start.checked_add(r) else {
                        return Err((key, format!("register {start} + {width} is past 65535")));
                    };
                    if let Some(other) = used.insert(reg, who.clone()) {
                        return Err((
                            key,
                            format!("register {reg} of {who} is also used by {other}"),
                        ));
                    }
                }
                Ok(())
            };
        let mut names = BTreeSet::new();
        for (i, r) in self.readings.iter().enumerate() {
            let key = format!("readings[{i}]");
            if r.name.is_empty() || !names.insert(r.name.clone()) {
                return e(
                    format!("{key}.name"),
                    format!("`{}` is empty or not unique", r.name),
                );
            }
            if r.kind == ValueType::Bool {
                return e(
                    format!("{key}.type"),
                    "readings are float32, uint16 or int16".into(),
                );
            }
            if !(r.deadband.is_finite() && r.deadband >= 0.0) {
                return e(format!("{key}.deadband"), "must be a number >= 0".into());
            }
            claim(
                format!("{key}.register"),
                r.name.clone(),
                r.register,
                r.kind.width(),
            )?;
        }
        let mut by_name: BTreeMap<&str, &ControlEntry> = BTreeMap::new();
        let mut bits: BTreeMap<u16, Vec<u8>> = BTreeMap::new();
        for (i, c) in self.controls.iter().enumerate() {
            let key = format!("controls[{i}]");
            if by_name.insert(c.name.as_str(), c).is_some() {
                return e(format!("{key}.name"), format!("`{}` appears twice", c.name));
            }
            match (c.kind, c.bit) {
                (ValueType::Bool, Some(b)) if b < 16 => {
                    let v = bits.entry(c.register).or_default();
                    if v.contains(&b) {
                        return e(
                            format!("{key}.bit"),
                            format!("bit {b} of {} is used twice", c.register),
                        );
                    }
                    v.push(b);
                }
                (ValueType::Bool, _) => {
                    return e(
                        format!("{key}.bit"),
                        "a bool control needs `bit: 0..15`".into(),
                    )
                }
                (ValueType::Float32, None) => {
                    claim(format!("{key}.register"), c.name.clone(), c.register, 2)?
                }
                (ValueType::Float32, Some(_)) => {
                    return e(format!("{key}.bit"), "a float32 control has no bit".into())
                }
                _ => return e(format!("{key}.type"), "controls are bool or float32".into()),
            }
        }
        for reg in bits.keys() {
            claim("controls".into(), format!("control word {reg}"), *reg, 1)?;
        }
        let bit = |name: &str| -> Result<Bit, (String, String)> {
            match by_name.get(name) {
                Some(c) if c.kind == ValueType::Bool => Ok(Bit {
                    register: c.register,
                    bit: c.bit.unwrap_or(0),
                }),
                _ => Err(("controls".into(), format!("needs a bool control `{name}`"))),
            }
        };
        let float = |name: &str| -> Result<u16, (String, String)> {
            match by_name.get(name) {
                Some(c) if c.kind == ValueType::Float32 => Ok(c.register),
                _ => Err((
                    "controls".into(),
                    format!("needs a float32 control `{name}`"),
                )),
            }
        };
        let controls = Controls {
            start_chiller: bit("set_start_chiller")?,
            start_co2: bit("set_start_co2")?,
            flow_active: bit("set_flow_active")?,
            alarm_reset: bit("set_alarm_reset")?,
            temperature_setpoint: float("set_temperature_setpoint")?,
            speed_setpoint: float("set_speed_setpoint")?,
            flow_setpoint: float("set_flow_setpoint")?,
        };
        if self.status.kind != ValueType::Uint16 {
            return e("status.type".into(), "the status word is uint16".into());
        }
        claim(
            "status.register".into(),
            "the status word".into(),
            self.status.register,
            1,
        )?;
        let mut alarm_words: BTreeMap<u16, Vec<u8>> = BTreeMap::new();
        for (i, a) in self.alarm_bits.iter().enumerate() {
            let key = format!("alarm_bits[{i}]");
            if a.bit > 15 {
                return e(format!("{key}.bit"), "must be 0..15".into());
            }
            let v = alarm_words.entry(a.register).or_default();
            if v.contains(&a.bit) {
                return e(
                    format!("{key}.bit"),
                    format!("bit {} of {} is used twice", a.bit, a.register),
                );
            }
            v.push(a.bit);
        }
        for reg in alarm_words.keys() {
            claim("alarm_bits".into(), format!("alarm word {reg}"), *reg, 1)?;
        }
        let spans = spans(used.keys().copied());
        Ok(RegisterMap {
            readings: self.readings,
            controls,
            status: self.status.register,
            alarms: self.alarm_bits,
            word_order,
            spans,
        })
    }
}

/// Groups sorted registers into contiguous runs of at most [`MAX_READ`]. A gap always
/// splits: a register the map does not name may not exist on the PLC, and reading it
/// would make the whole request fail.
pub fn spans(registers: impl IntoIterator<Item = u16>) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for r in registers {
        match out.last_mut() {
            Some(s) if s.end() == u32::from(r) && s.count < MAX_READ => s.count += 1,
            _ => out.push(Span { start: r, count: 1 }),
        }
    }
    out
}

/// A float32 as two registers in `order`.
pub fn encode_f32(v: f32, order: WordOrder) -> [u16; 2] {
    let bits = v.to_bits();
    let (hi, lo) = ((bits >> 16) as u16, bits as u16);
    match order {
        WordOrder::LowFirst => [lo, hi],
        WordOrder::HighFirst => [hi, lo],
    }
}

/// Two registers in `order` as a float32.
pub fn decode_f32(words: [u16; 2], order: WordOrder) -> f32 {
    let (hi, lo) = match order {
        WordOrder::LowFirst => (words[1], words[0]),
        WordOrder::HighFirst => (words[0], words[1]),
    };
    f32::from_bits((u32::from(hi) << 16) | u32::from(lo))
}

/// Register values read in one poll, by address.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Image(pub BTreeMap<u16, u16>);

impl Image {
    /// Stores what a read of `span` returned.
    pub fn fill(&mut self, span: Span, words: &[u16]) {
        for (i, w) in words.iter().enumerate() {
            // A span is at most MAX_READ long, so `i` fits.
            self.0.insert(span.start.wrapping_add(i as u16), *w);
        }
    }

    /// One register.
    pub fn word(&self, register: u16) -> Option<u16> {
        self.0.get(&register).copied()
    }
}

impl RegisterMap {
    /// A reading's value from `image`: `None` if a register is missing or the float is
    /// not finite (a PLC sends NaN for a sensor it cannot read).
    pub fn value(&self, r: &Reading, image: &Image) -> Option<f64> {
        let w = image.word(r.register)?;
        match r.kind {
            ValueType::Float32 => {
                let v = decode_f32(
                    [w, image.word(r.register.checked_add(1)?)?],
                    self.word_order,
                );
                v.is_finite().then_some(f64::from(v))
            }
            ValueType::Uint16 => Some(f64::from(w)),
            ValueType::Int16 => Some(f64::from(w as i16)),
            ValueType::Bool => None,
        }
    }

    /// The alarm bits set in `image`.
    pub fn active_alarms<'a>(
        &'a self,
        image: &'a Image,
    ) -> impl Iterator<Item = &'a AlarmBit> + 'a {
        self.alarms.iter().filter(move |a| {
            image
                .word(a.register)
                .is_some_and(|w| w & (1 << a.bit) != 0)
        })
    }

    /// The reading called `name`.
    pub fn reading(&self, name: &str) -> Option<&Reading> {
        self.readings.iter().find(|r| r.name == name)
    }

    /// Every register the map names (the simulator serves exactly these).
    pub fn registers(&self) -> BTreeSet<u16> {
        self.spans
            .iter()
            .flat_map(|s| s.start..s.start.saturating_add(s.count))
            .collect()
    }

    /// The registers a client may write: control words and set-points.
    pub fn writable(&self) -> BTreeSet<u16> {
        let c = &self.controls;
        let mut out: BTreeSet<u16> = [c.start_chiller, c.start_co2, c.flow_active, c.alarm_reset]
            .iter()
            .map(|b| b.register)
            .collect();
        for r in [c.temperature_setpoint, c.speed_setpoint, c.flow_setpoint] {
            out.insert(r);
            out.insert(r + 1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_map() -> RegisterMap {
        let text = include_str!("../../../deploy/marta-registers.yaml");
        serde_yaml::from_str::<MapFile>(text)
            .unwrap()
            .check()
            .unwrap()
    }

    #[test]
    fn float32_word_order_is_low_word_first() {
        // PEERS.md: -30.5 is [0, 49652] on MARTA.
        assert_eq!(encode_f32(-30.5, WordOrder::LowFirst), [0, 49652]);
        assert_eq!(decode_f32([0, 49652], WordOrder::LowFirst), -30.5);
        assert_eq!(encode_f32(-30.5, WordOrder::HighFirst), [49652, 0]);
        for v in [0.0f32, 1.0, -35.0, 6000.0, 2.75, f32::MIN_POSITIVE, 123.456] {
            for o in [WordOrder::LowFirst, WordOrder::HighFirst] {
                assert_eq!(decode_f32(encode_f32(v, o), o).to_bits(), v.to_bits());
            }
        }
        // A word order mixed up is not silently close: 1.5 read the wrong way round.
        assert_ne!(
            decode_f32(encode_f32(1.5, WordOrder::LowFirst), WordOrder::HighFirst),
            1.5
        );
    }

    #[test]
    fn the_shared_map_loads_with_its_55_readings() {
        let m = shared_map();
        assert_eq!(m.readings.len(), 55);
        assert_eq!(m.word_order, WordOrder::LowFirst);
        assert_eq!(
            m.controls.start_co2,
            Bit {
                register: 305,
                bit: 1
            }
        );
        assert_eq!(m.controls.alarm_reset.mask(), 0b1000);
        assert_eq!(m.controls.temperature_setpoint, 310);
        assert_eq!(m.status, 320);
        assert_eq!(m.alarms.len(), 49);
        // 100..165 and 168..211 (166 is not in the map), the alarm words 300..303,
        // the control word, the set-points 310..315, the status word.
        assert_eq!(
            m.spans,
            vec![
                Span {
                    start: 100,
                    count: 66
                },
                Span {
                    start: 168,
                    count: 44
                },
                Span {
                    start: 300,
                    count: 4
                },
                Span {
                    start: 305,
                    count: 1
                },
                Span {
                    start: 310,
                    count: 6
                },
                Span {
                    start: 320,
                    count: 1
                },
            ]
        );
        assert!(m.writable().contains(&305) && m.writable().contains(&315));
        assert!(!m.writable().contains(&320) && !m.writable().contains(&100));
    }

    #[test]
    fn spans_split_at_gaps_and_at_the_protocol_limit() {
        assert_eq!(spans([]), vec![]);
        assert_eq!(
            spans([5, 6, 8]),
            vec![Span { start: 5, count: 2 }, Span { start: 8, count: 1 }]
        );
        let long = spans(0..300);
        assert_eq!(
            long,
            vec![
                Span {
                    start: 0,
                    count: 125
                },
                Span {
                    start: 125,
                    count: 125
                },
                Span {
                    start: 250,
                    count: 50
                },
            ]
        );
        assert_eq!(
            spans([65534, 65535]),
            vec![Span {
                start: 65534,
                count: 2
            }]
        );
    }

    #[test]
    fn values_and_alarm_bits_from_an_image() {
        let m = shared_map();
        let mut img = Image::default();
        let tt = m.reading("TT05_CO2").unwrap();
        let w = encode_f32(-31.25, WordOrder::LowFirst);
        img.fill(
            Span {
                start: tt.register,
                count: 2,
            },
            &w,
        );
        assert_eq!(m.value(tt, &img), Some(-31.25));
        // Missing second word, NaN: no value.
        let other = m.reading("TT06_CO2").unwrap();
        img.fill(
            Span {
                start: other.register,
                count: 1,
            },
            &[0],
        );
        assert_eq!(m.value(other, &img), None);
        img.fill(
            Span {
                start: other.register,
                count: 2,
            },
            &encode_f32(f32::NAN, WordOrder::LowFirst),
        );
        assert_eq!(m.value(other, &img), None);
        // EB_FS is bit 7 of 301; PS_HP_FS bit 2 of 300.
        img.fill(
            Span {
                start: 300,
                count: 4,
            },
            &[1 << 2, 1 << 7, 0, 0],
        );
        let names: Vec<_> = m.active_alarms(&img).map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["PS_HP_FS", "EB_FS"]);
    }

    #[test]
    fn broken_maps_name_the_key() {
        let base = include_str!("../../../deploy/marta-registers.yaml");
        let check = |text: &str| {
            serde_yaml::from_str::<MapFile>(text)
                .unwrap()
                .check()
                .unwrap_err()
        };
        let (k, m) = check(&base.replace("register: 102\n", "register: 101\n"));
        assert_eq!(k, "readings[1].register");
        assert!(
            m.contains("register 101 of PT03_R452A is also used by PT01_R452A"),
            "{m}"
        );
        let (k, m) = check(&base.replace("- name: set_flow_setpoint", "- name: set_flow_sp"));
        assert_eq!(k, "controls");
        assert!(m.contains("set_flow_setpoint"), "{m}");
        let (k, _) = check(&base.replace(
            "register: 305\n  type: bool\n  bit: 2",
            "register: 305\n  type: bool\n  bit: 1",
        ));
        assert_eq!(k, "controls[2].bit");
        let (k, _) = check(&base.replace("low word first", "word order as usual"));
        assert_eq!(k, "float32");
        let (k, _) = check(&base.replace(
            "  register: 320\n  type: uint16",
            "  register: 320\n  type: float32",
        ));
        assert_eq!(k, "status.type");
        let (k, _) =
            check(&base.replace("  register: 303\n  bit: 7", "  register: 303\n  bit: 16"));
        assert_eq!(k, "alarm_bits[48].bit");
        // Alarm word on a reading's register.
        let (k, m) = check(&base.replace("  register: 303\n  bit: 7", "  register: 210\n  bit: 7"));
        assert_eq!(k, "alarm_bits");
        assert!(m.contains("alarm word 210 is also used by TC04_TSP"), "{m}");
    }
}
