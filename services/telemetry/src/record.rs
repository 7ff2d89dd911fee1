//! What one spool record holds: the receive time of an MQTT message and its lines.

/// Encodes a record: receive time (ns, little-endian) then the lines, UTF-8.
pub fn encode(received_ns: i64, lines: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + lines.len());
    v.extend_from_slice(&received_ns.to_le_bytes());
    v.extend_from_slice(lines.as_bytes());
    v
}

/// Decodes a record; `None` for bytes this version did not write.
pub fn decode(rec: &[u8]) -> Option<(i64, &str)> {
    let (t, lines) = rec.split_at_checked(8)?;
    let t = i64::from_le_bytes(t.try_into().ok()?);
    Some((t, std::str::from_utf8(lines).ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_garbage() {
        let r = super::encode(-5, "m x=1 1\n");
        assert_eq!(super::decode(&r), Some((-5, "m x=1 1\n")));
        assert_eq!(super::decode(b"short"), None);
        assert_eq!(super::decode(b"12345678\xff"), None);
    }
}
