//! JSON payload to flat `(key, scalar)` pairs in one pass, without building a
//! `serde_json::Value` tree first (the forwarder's hottest path): nested objects and
//! arrays become `a_b` and `a_0` keys, nulls are skipped.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The flat pairs of one JSON object.
pub type Flat = Vec<(String, Value)>;

/// Parses an object, or an array of objects, into one [`Flat`] per object.
pub fn parse(payload: &[u8]) -> Result<Vec<Flat>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let out = de.deserialize_any(Top)?;
    de.end()?;
    Ok(out)
}

struct Top;

impl<'de> Visitor<'de> for Top {
    type Value = Vec<Flat>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or an array of objects")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<Flat>, A::Error> {
        let mut flat = Flat::new();
        Fields {
            prefix: "",
            out: &mut flat,
        }
        .visit_map(map)?;
        Ok(vec![flat])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Flat>, A::Error> {
        let mut out = Vec::new();
        while let Some(flat) = seq.next_element_seed(Object)? {
            out.push(flat);
        }
        Ok(out)
    }
}

/// One element of a top-level array: must be an object.
struct Object;

impl<'de> DeserializeSeed<'de> for Object {
    type Value = Flat;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Flat, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Object {
    type Value = Flat;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Flat, A::Error> {
        let mut flat = Flat::new();
        Fields {
            prefix: "",
            out: &mut flat,
        }
        .visit_map(map)?;
        Ok(flat)
    }
}

/// A value under `prefix`: scalars are pushed, containers recursed into.
struct Fields<'a> {
    prefix: &'a str,
    out: &'a mut Flat,
}

impl Fields<'_> {
    fn join(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}_{key}", self.prefix)
        }
    }

    fn push(self, v: Value) {
        self.out.push((self.prefix.to_string(), v));
    }
}

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.push(Value::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.push(Value::from(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.push(Value::from(v));
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        let n = serde_json::Number::from_f64(v)
            .ok_or_else(|| E::custom(format!("{v} is not a JSON number")))?;
        self.push(Value::Number(n));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.push(Value::String(v.to_string()));
        Ok(())
    }

    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.push(Value::String(v));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(Key)? {
            let prefix = self.join(&key);
            map.next_value_seed(Fields {
                prefix: &prefix,
                out: self.out,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let prefix = self.join(&i.to_string());
            let next = seq.next_element_seed(Fields {
                prefix: &prefix,
                out: self.out,
            })?;
            if next.is_none() {
                return Ok(());
            }
            i += 1;
            if i > 10_000 {
                return Err(A::Error::custom("array longer than 10000 elements"));
            }
        }
    }
}

/// A key, borrowed from the payload when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_in_payload_order() {
        let got = parse(
            br#"{"b": 1, "a": {"x": true, "y": [1.5, null, "s"]}, "n": null, "e\u00e9": -2}"#,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![vec![
                ("b".into(), Value::from(1u64)),
                ("a_x".into(), Value::Bool(true)),
                ("a_y_0".into(), Value::from(1.5)),
                ("a_y_2".into(), Value::from("s")),
                ("eé".into(), Value::from(-2i64)),
            ]]
        );
    }

    #[test]
    fn arrays_of_objects_and_refusals() {
        assert_eq!(parse(br#"[{"x": 1}, {}]"#).unwrap().len(), 2);
        for bad in [&b"3"[..], b"\"s\"", b"[1]", b"{", b"{} x", b"", b"\xff"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let e = parse(b"[1]").unwrap_err().to_string();
        assert!(e.contains("expected an object"), "{e}");
    }
}
