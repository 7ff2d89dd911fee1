//! PV names and the parameters of a CAEN channel (SPEC 4.1), with the JSON field each
//! one feeds in `<name>/channels` (SPEC 3.1).

/// Which supply of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Low voltage.
    Lv,
    /// High voltage.
    Hv,
}

impl Side {
    /// `lv` or `hv`, as in topics and field names.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Lv => "lv",
            Side::Hv => "hv",
        }
    }

    /// The parameters of this side, in the order of [`Param::index`].
    pub fn params(self) -> &'static [Param] {
        match self {
            Side::Lv => LV_PARAMS,
            Side::Hv => HV_PARAMS,
        }
    }
}

/// A channel parameter (one PV per channel side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Param {
    V0Set,
    I0Set,
    Pw,
    Trip,
    TripInt,
    TripExt,
    Status,
    VMon,
    IMon,
    UnVThr,
    OvVThr,
    RUpTime,
    RDwTime,
    Temp,
    RUp,
    RDwn,
    PDwn,
    ImRange,
}

/// Every LV parameter.
pub const LV_PARAMS: &[Param] = &[
    Param::V0Set,
    Param::I0Set,
    Param::Pw,
    Param::Trip,
    Param::TripInt,
    Param::TripExt,
    Param::Status,
    Param::VMon,
    Param::IMon,
    Param::UnVThr,
    Param::OvVThr,
    Param::RUpTime,
    Param::RDwTime,
    Param::Temp,
];

/// Every HV parameter.
pub const HV_PARAMS: &[Param] = &[
    Param::V0Set,
    Param::I0Set,
    Param::Pw,
    Param::Trip,
    Param::TripInt,
    Param::TripExt,
    Param::Status,
    Param::VMon,
    Param::IMon,
    Param::RUp,
    Param::RDwn,
    Param::PDwn,
    Param::ImRange,
];

impl Param {
    /// The last component of the PV name.
    pub fn suffix(self) -> &'static str {
        match self {
            Param::V0Set => "V0Set",
            Param::I0Set => "I0Set",
            Param::Pw => "Pw",
            Param::Trip => "Trip",
            Param::TripInt => "TripInt",
            Param::TripExt => "TripExt",
            Param::Status => "Status",
            Param::VMon => "VMon",
            Param::IMon => "IMon",
            Param::UnVThr => "UNVThr",
            Param::OvVThr => "OVVThr",
            Param::RUpTime => "RUpTime",
            Param::RDwTime => "RDwTime",
            Param::Temp => "Temp",
            Param::RUp => "RUp",
            Param::RDwn => "RDWn",
            Param::PDwn => "PDwn",
            Param::ImRange => "ImRange",
        }
    }

    /// Field name in the `<name>/channels` object, without the `lv_`/`hv_` prefix;
    /// `None` for `Pw`, which the Python original did not publish (Status carries it).
    pub fn field(self) -> Option<&'static str> {
        Some(match self {
            Param::V0Set => "setV",
            Param::I0Set => "maxI",
            Param::Pw => return None,
            Param::Trip => "tripTime",
            Param::TripInt => "tripInt",
            Param::TripExt => "tripExt",
            Param::Status => "status",
            Param::VMon => "vMon",
            Param::IMon => "iMon",
            Param::UnVThr => "unVthr",
            Param::OvVThr => "ovVthr",
            Param::RUpTime => "rampUpTime",
            Param::RDwTime => "rampDwnTime",
            Param::Temp => "temp",
            Param::RUp => "rampUpSpeed",
            Param::RDwn => "rampDwnSpeed",
            Param::PDwn => "tripMode",
            Param::ImRange => "imRange",
        })
    }

    /// Monitor deadband (SPEC 4.1): 0.01 on VMon and IMon, 2 on Temp, none elsewhere.
    pub fn deadband(self) -> f64 {
        match self {
            Param::VMon | Param::IMon => 0.01,
            Param::Temp => 2.0,
            _ => 0.0,
        }
    }

    /// Published as an integer (status words and trip masks).
    pub fn is_integer(self) -> bool {
        matches!(self, Param::Status | Param::TripInt | Param::TripExt)
    }

    /// An enum PV, published by its label.
    pub fn is_enum(self) -> bool {
        matches!(self, Param::Pw | Param::PDwn | Param::ImRange)
    }

    /// Position in [`Side::params`].
    pub fn index(self, side: Side) -> Option<usize> {
        side.params().iter().position(|p| *p == self)
    }
}

/// `<prefix>:<board %02d>:<chan %03d>:<param>`.
pub fn name(prefix: &str, board: u8, chan: u16, param: Param) -> String {
    format!("{prefix}:{board:02}:{chan:03}:{}", param.suffix())
}

/// `<prefix>:ClearAlarm`.
pub fn clear_alarm(prefix: &str) -> String {
    format!("{prefix}:ClearAlarm")
}

/// CAEN channel status bits (SPEC 4.2), for messages.
pub const STATUS_BITS: &[(u32, &str)] = &[
    (0, "on"),
    (1, "ramping up"),
    (2, "ramping down"),
    (3, "overcurrent"),
    (4, "overvoltage"),
    (5, "undervoltage"),
    (6, "external trip"),
    (7, "max V"),
    (8, "external disable"),
    (9, "internal trip"),
    (10, "calibration error"),
    (11, "unplugged"),
    (13, "overvoltage protection"),
    (14, "power fail"),
    (15, "temperature error"),
];

/// The set bits of a status word in words: `on, ramping up`.
pub fn describe_status(word: i64) -> String {
    let names: Vec<&str> = STATUS_BITS
        .iter()
        .filter(|(b, _)| word >> b & 1 == 1)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "off".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pv_names_follow_the_caen_ioc() {
        assert_eq!(
            name("cleanroom", 0, 3, Param::V0Set),
            "cleanroom:00:003:V0Set"
        );
        assert_eq!(name("lab", 12, 11, Param::RDwn), "lab:12:011:RDWn");
        assert_eq!(name("lab", 1, 0, Param::UnVThr), "lab:01:000:UNVThr");
        assert_eq!(clear_alarm("lab"), "lab:ClearAlarm");
    }

    #[test]
    fn every_field_of_the_contract_is_covered() {
        let mut fields: Vec<String> = Vec::new();
        for side in [Side::Lv, Side::Hv] {
            for p in side.params() {
                if let Some(f) = p.field() {
                    fields.push(format!("{}_{f}", side.as_str()));
                }
            }
        }
        for f in [
            "lv_status",
            "lv_setV",
            "lv_vMon",
            "lv_iMon",
            "lv_maxI",
            "lv_tripTime",
            "lv_tripInt",
            "lv_tripExt",
            "lv_unVthr",
            "lv_ovVthr",
            "lv_rampUpTime",
            "lv_rampDwnTime",
            "lv_temp",
            "hv_status",
            "hv_setV",
            "hv_vMon",
            "hv_iMon",
            "hv_maxI",
            "hv_tripTime",
            "hv_tripInt",
            "hv_tripExt",
            "hv_rampUpSpeed",
            "hv_rampDwnSpeed",
            "hv_imRange",
            "hv_tripMode",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} missing");
        }
        assert_eq!(fields.len(), 25);
    }

    #[test]
    fn status_words_in_words() {
        assert_eq!(describe_status(0), "off");
        assert_eq!(describe_status(3), "on, ramping up");
        assert_eq!(
            describe_status(1 << 9 | 1 << 3),
            "overcurrent, internal trip"
        );
    }
}
