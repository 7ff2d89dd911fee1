//! InfluxDB line protocol: points in, bytes out. No I/O.
//!
//! `measurement[,tag=value...] field=value[,field=value...] timestamp_ns`
//!
//! Escaping (InfluxDB 1.x and 2.x): in measurements, commas and spaces; in tag keys, tag
//! values and field keys, commas, equals signs and spaces; in string field values,
//! double quotes and backslashes. Line breaks cannot be escaped anywhere except inside
//! string field values, so names and tag values containing them are refused; so are
//! backslashes in names, which InfluxDB's parser reads ambiguously before an escaped
//! separator (`a\\ b`).

use std::fmt::Write as _;

/// A field value with its line-protocol type.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// 64-bit float (`1.5`).
    Float(f64),
    /// Signed integer (`3i`).
    Int(i64),
    /// Unsigned integer (`3u`).
    UInt(u64),
    /// Boolean (`true`).
    Bool(bool),
    /// String (`"LV_ON"`), kept: Telegraf drops them unless listed.
    Str(String),
}

/// One point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Measurement name.
    pub measurement: String,
    /// Tags; written sorted by key, as InfluxDB recommends.
    pub tags: Vec<(String, String)>,
    /// Fields; at least one.
    pub fields: Vec<(String, FieldValue)>,
    /// Nanoseconds since the epoch, UTC.
    pub timestamp_ns: i64,
}

/// Why a point cannot be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError(pub String);

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeError {}

fn check_name(what: &str, s: &str) -> Result<(), EncodeError> {
    if s.is_empty() {
        return Err(EncodeError(format!("empty {what}")));
    }
    // One pass for the common case; the messages below need the slower checks.
    if !s.bytes().any(|b| matches!(b, b'\n' | b'\r' | b'\\')) {
        return Ok(());
    }
    if s.contains(['\n', '\r']) {
        return Err(EncodeError(format!(
            "{what} `{}` contains a line break",
            s.escape_debug()
        )));
    }
    if s.contains('\\') {
        return Err(EncodeError(format!("{what} `{s}` contains a backslash")));
    }
    Ok(())
}

/// Appends `s` with a backslash before each of `special` (all ASCII, so a byte scan is
/// safe in UTF-8), copying the runs between them whole.
fn escape(out: &mut String, s: &str, special: &[u8]) {
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        if special.contains(&b) {
            out.push_str(&s[from..i]);
            out.push('\\');
            from = i;
        }
    }
    out.push_str(&s[from..]);
}

/// Appends one line (with its `\n`) for `p` to `out`. On error `out` is unchanged.
pub fn encode(p: &Point, out: &mut String) -> Result<(), EncodeError> {
    check_name("measurement", &p.measurement)?;
    if p.fields.is_empty() {
        return Err(EncodeError(format!(
            "point `{}` has no fields",
            p.measurement
        )));
    }
    let start = out.len();
    let result = encode_into(p, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_into(p: &Point, out: &mut String) -> Result<(), EncodeError> {
    escape(out, &p.measurement, b", ");
    let mut tags: Vec<&(String, String)> = p.tags.iter().collect();
    tags.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in tags {
        check_name("tag key", k)?;
        // An empty tag value is not allowed: the tag is left out, as Telegraf does.
        if v.is_empty() {
            continue;
        }
        check_name("tag value", v)?;
        out.push(',');
        escape(out, k, b",= ");
        out.push('=');
        escape(out, v, b",= ");
    }
    for (i, (k, v)) in p.fields.iter().enumerate() {
        check_name("field key", k)?;
        out.push(if i == 0 { ' ' } else { ',' });
        escape(out, k, b",= ");
        out.push('=');
        match v {
            FieldValue::Float(f) if !f.is_finite() => {
                return Err(EncodeError(format!(
                    "field `{k}` is {f}: InfluxDB stores finite numbers only"
                )));
            }
            FieldValue::Float(f) => {
                // Debug keeps a decimal point (`1.0`), so the type stays float.
                let _ = write!(out, "{f:?}");
            }
            FieldValue::Int(i) => {
                let _ = write!(out, "{i}i");
            }
            FieldValue::UInt(u) => {
                let _ = write!(out, "{u}u");
            }
            FieldValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            FieldValue::Str(s) => {
                out.push('"');
                escape(out, s, b"\"\\");
                out.push('"');
            }
        }
    }
    let _ = writeln!(out, " {}", p.timestamp_ns);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(m: &str, tags: &[(&str, &str)], fields: Vec<(&str, FieldValue)>) -> Point {
        Point {
            measurement: m.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            timestamp_ns: 1_700_000_000_123_456_789,
        }
    }

    fn line(p: &Point) -> Result<String, EncodeError> {
        let mut s = String::new();
        encode(p, &mut s).map(|_| s)
    }

    #[test]
    fn types_and_order() {
        let p = point(
            "channels",
            &[("module", "M 1"), ("id", "0")],
            vec![
                ("lv_vMon", FieldValue::Float(12.0)),
                ("lv_status", FieldValue::Int(1)),
                ("count", FieldValue::UInt(7)),
                ("on", FieldValue::Bool(true)),
                ("fsm_state", FieldValue::Str("LV_ON".into())),
            ],
        );
        assert_eq!(
            line(&p).unwrap(),
            "channels,id=0,module=M\\ 1 lv_vMon=12.0,lv_status=1i,count=7u,on=true,fsm_state=\"LV_ON\" 1700000000123456789\n"
        );
    }

    #[test]
    fn escaping() {
        let p = point(
            "my meas,x",
            &[("tag key=", "v,a=l ue")],
            vec![("f k", FieldValue::Str(r#"say "hi" \ bye"#.into()))],
        );
        assert_eq!(
            line(&p).unwrap(),
            "my\\ meas\\,x,tag\\ key\\==v\\,a\\=l\\ ue f\\ k=\"say \\\"hi\\\" \\\\ bye\" 1700000000123456789\n"
        );
        // Line breaks are fine inside string values, nowhere else.
        let ok = point("m", &[], vec![("f", FieldValue::Str("a\nb".into()))]);
        assert!(line(&ok).is_ok());
        let bad = point("m", &[("t", "a\nb")], vec![("f", FieldValue::Int(1))]);
        assert!(line(&bad).unwrap_err().0.contains("line break"));
    }

    #[test]
    fn refusals_leave_the_buffer_alone() {
        let mut out = String::from("keep\n");
        for p in [
            point("", &[], vec![("f", FieldValue::Int(1))]),
            point("m", &[], vec![]),
            point("m", &[], vec![("f", FieldValue::Float(f64::NAN))]),
            point("m", &[("k", "v\\")], vec![("f", FieldValue::Int(1))]),
            point("m\\x", &[], vec![("f", FieldValue::Int(1))]),
            point("m", &[], vec![("", FieldValue::Int(1))]),
        ] {
            assert!(encode(&p, &mut out).is_err(), "{p:?}");
        }
        assert_eq!(out, "keep\n");
    }

    #[test]
    fn empty_tag_values_are_left_out() {
        let p = point(
            "m",
            &[("a", ""), ("b", "x")],
            vec![("f", FieldValue::Int(1))],
        );
        assert_eq!(line(&p).unwrap(), "m,b=x f=1i 1700000000123456789\n");
    }

    /// Byte index of the first `c` not escaped by a backslash.
    fn first_unescaped(s: &str, c: char) -> usize {
        let mut esc = false;
        for (i, ch) in s.char_indices() {
            match (esc, ch) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, x) if x == c => return i,
                _ => {}
            }
        }
        s.len()
    }

    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut esc = false;
        for ch in s.chars() {
            if !esc && ch == '\\' {
                esc = true;
            } else {
                out.push(ch);
                esc = false;
            }
        }
        out
    }

    /// Reads a line back the way InfluxDB's parser does (for names without backslashes
    /// and one string field), for the property test.
    fn parse(line: &str) -> (String, Vec<(String, String)>, String, String) {
        let line = line.strip_suffix('\n').unwrap();
        let (rest, ts) = line.rsplit_once(' ').unwrap();
        assert_eq!(ts, "1");
        let i = first_unescaped(rest, ' ');
        let (mut head, field) = (&rest[..i], &rest[i + 1..]);
        let mut parts = Vec::new();
        loop {
            let j = first_unescaped(head, ',');
            parts.push(&head[..j]);
            if j == head.len() {
                break;
            }
            head = &head[j + 1..];
        }
        let measurement = unescape(parts[0]);
        let tags = parts[1..]
            .iter()
            .map(|t| {
                let j = first_unescaped(t, '=');
                (unescape(&t[..j]), unescape(&t[j + 1..]))
            })
            .collect();
        let j = first_unescaped(field, '=');
        let value = field[j + 1..]
            .strip_prefix('"')
            .unwrap()
            .strip_suffix('"')
            .unwrap();
        (measurement, tags, unescape(&field[..j]), unescape(value))
    }

    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        // Printable text with every separator and quotes; no line breaks or backslashes.
        "[a-zA-Z0-9 ,=\"_.:/ä-]{1,12}"
    }

    proptest! {
        #[test]
        fn escaping_round_trips(m in name(), k in name(), v in name(), fk in name(), fv in "[ -~\n]{0,20}") {
            let p = Point {
                measurement: m.clone(),
                tags: vec![(k.clone(), v.clone())],
                fields: vec![(fk.clone(), FieldValue::Str(fv.clone()))],
                timestamp_ns: 1,
            };
            let l = line(&p).unwrap();
            prop_assert!(l.ends_with(" 1\n"));
            let (pm, tags, pk, pv) = parse(&l);
            prop_assert_eq!(pm, m);
            prop_assert_eq!(tags, vec![(k, v)]);
            prop_assert_eq!(pk, fk);
            prop_assert_eq!(pv, fv);
        }
    }
}
