//! The interlock's signed permit (`<interlock>/permits`), shared by the signer and every
//! service that obeys it.
//!
//! Neither rumqttd nor a default Mosquitto stops a client from publishing on any topic,
//! so the permit is authenticated end to end: HMAC-SHA256 with a key that only the
//! interlock and the services it permits can read. A verifier accepts a permit only if
//! - its signature is valid for this topic (a permit of another interlock does not
//!   count),
//! - it is recent (`time` within `max_age` of the verifier's clock, either way), and
//! - it is newer than the last one accepted: `(boot_ns, seq)` strictly increasing,
//!   where `boot_ns` is the interlock's start and `seq` counts its permits, so an old
//!   permit replayed later is refused even while it is still recent.
//!
//! Wire form (JSON, retained):
//! `{"lv_on": bool, "reasons": [str], "time": ns, "boot_ns": ns, "seq": n, "sig": base64}`.
//! The signature covers the line-separated text
//! `tracker-dcs permit v1 / topic / lv_on / reasons as compact JSON / time / boot_ns / seq`.
//! No I/O here except reading or creating the key file.

use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value as Json};
use sha2::Sha256;

use crate::UtcNanos;

type HmacSha256 = Hmac<Sha256>;

/// Environment variable holding the key text; overrides the configured file.
pub const KEY_ENV: &str = "DCS_PERMIT_KEY";

/// Shortest key accepted, in bytes of key-file text.
pub const MIN_KEY_LEN: usize = 16;

/// The shared secret (the trimmed text of the key file).
#[derive(Clone)]
pub struct PermitKey(Vec<u8>);

impl std::fmt::Debug for PermitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PermitKey(..)")
    }
}

impl PermitKey {
    /// A key from secret text (at least [`MIN_KEY_LEN`] bytes once trimmed).
    pub fn from_text(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.len() < MIN_KEY_LEN {
            return Err(format!(
                "the permit key is {} bytes long; it needs at least {MIN_KEY_LEN} (random text, \
                 e.g. `head -c 32 /dev/urandom | base64`)",
                t.len()
            ));
        }
        Ok(PermitKey(t.as_bytes().to_vec()))
    }

    /// Reads the key file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the permit key {}: {e}", path.display()))?;
        Self::from_text(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads the key file, creating it (random, mode 0600) if it does not exist. Only
    /// the signer does this; verifiers [`load`](Self::load).
    pub fn load_or_create(path: &Path) -> Result<Self, String> {
        if path.exists() {
            return Self::load(path);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let text = generate();
        write_private(path, &text)
            .map_err(|e| format!("cannot write the permit key {}: {e}", path.display()))?;
        tracing::info!(file = %path.display(), "created a permit key");
        Self::from_text(&text)
    }

    /// The key from the environment variable [`KEY_ENV`] if set (containers take it
    /// from a secret), else from `file`: created if missing when `create` (the signer),
    /// else it must exist.
    pub fn from_env_or_file(file: Option<&Path>, create: bool) -> Result<Self, String> {
        if let Ok(text) = std::env::var(KEY_ENV) {
            return Self::from_text(&text).map_err(|e| format!("${KEY_ENV}: {e}"));
        }
        match file {
            Some(f) if create => Self::load_or_create(f),
            Some(f) => Self::load(f),
            None => Err(format!(
                "no permit key: set permit_key_file (the file the interlock signs its permits \
                 with) or ${KEY_ENV}"
            )),
        }
    }

    fn mac(&self, text: &str) -> HmacSha256 {
        // HMAC takes keys of any length: this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(text.as_bytes());
        mac
    }
}

/// Random key text (32 random bytes, base64).
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    STANDARD.encode(bytes)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// What a permit says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    /// Whether LV may be switched on.
    pub lv_on: bool,
    /// Why not (empty when allowed).
    pub reasons: Vec<String>,
    /// When the interlock issued it.
    pub time: UtcNanos,
    /// When the interlock started.
    pub boot_ns: i64,
    /// Counts the interlock's permits since `boot_ns`.
    pub seq: u64,
}

fn signed_text(topic: &str, p: &Permit) -> String {
    let reasons = serde_json::to_string(&p.reasons).unwrap_or_default();
    format!(
        "tracker-dcs permit v1\n{topic}\n{}\n{reasons}\n{}\n{}\n{}",
        p.lv_on,
        p.time.as_nanos(),
        p.boot_ns,
        p.seq
    )
}

/// The signed payload of `permit` on `topic`.
pub fn sign(key: &PermitKey, topic: &str, permit: &Permit) -> Json {
    let tag = key.mac(&signed_text(topic, permit)).finalize().into_bytes();
    json!({
        "lv_on": permit.lv_on,
        "reasons": permit.reasons,
        "time": permit.time.as_nanos(),
        "boot_ns": permit.boot_ns,
        "seq": permit.seq,
        "sig": STANDARD.encode(tag),
    })
}

/// Why a permit was not accepted (the text is for the operator and the log).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// Not a permit document at all.
    #[error("not a permit ({0})")]
    Malformed(String),
    /// No or a wrong signature: not from the interlock, or another key.
    #[error("bad signature: not signed by the interlock with this service's permit key")]
    BadSignature,
    /// Valid, but issued too long ago (or too far in the future).
    #[error("stale: issued {age_secs:.0} s ago, more than the {max_secs:.0} s allowed (a negative age is a permit from the future: check the clocks)")]
    Stale {
        /// |now - time|, seconds.
        age_secs: f64,
        /// The limit.
        max_secs: f64,
    },
    /// Valid and recent, but not newer than the last one accepted (a replay).
    #[error(
        "out of sequence: boot {boot_ns} seq {seq} is not newer than boot {last_boot} seq {last_seq} \
         already accepted (a replayed permit)"
    )]
    Replayed {
        /// The permit's boot.
        boot_ns: i64,
        /// The permit's sequence number.
        seq: u64,
        /// The last accepted boot.
        last_boot: i64,
        /// The last accepted sequence number.
        last_seq: u64,
    },
}

/// Checks the signature only.
pub fn verify(key: &PermitKey, topic: &str, payload: &[u8]) -> Result<Permit, Refusal> {
    let doc: Json =
        serde_json::from_slice(payload).map_err(|e| Refusal::Malformed(format!("{e}")))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| Refusal::Malformed("not a JSON object".into()))?;
    let field = |name: &str| {
        obj.get(name)
            .ok_or_else(|| Refusal::Malformed(format!("no `{name}`")))
    };
    let bad = |name: &str| Refusal::Malformed(format!("`{name}` has the wrong type"));
    let lv_on = field("lv_on")?.as_bool().ok_or_else(|| bad("lv_on"))?;
    let reasons = field("reasons")?
        .as_array()
        .ok_or_else(|| bad("reasons"))?
        .iter()
        .map(|r| r.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("reasons"))?;
    let time = UtcNanos(field("time")?.as_i64().ok_or_else(|| bad("time"))?);
    let boot_ns = field("boot_ns")?.as_i64().ok_or_else(|| bad("boot_ns"))?;
    let seq = field("seq")?.as_u64().ok_or_else(|| bad("seq"))?;
    let sig = field("sig")?.as_str().ok_or(Refusal::BadSignature)?;
    let tag = STANDARD.decode(sig).map_err(|_| Refusal::BadSignature)?;
    let permit = Permit {
        lv_on,
        reasons,
        time,
        boot_ns,
        seq,
    };
    key.mac(&signed_text(topic, &permit))
        .verify_slice(&tag)
        .map_err(|_| Refusal::BadSignature)?;
    Ok(permit)
}

/// Accepts valid, recent, in-sequence permits. Pure: the clock is passed in.
#[derive(Debug, Clone)]
pub struct Verifier {
    key: PermitKey,
    max_age_ns: i64,
    last: Option<(i64, u64)>,
}

impl Verifier {
    /// A verifier for permits at most `max_age_secs` old.
    pub fn new(key: PermitKey, max_age_secs: f64) -> Self {
        Verifier {
            key,
            max_age_ns: (max_age_secs * 1e9) as i64,
            last: None,
        }
    }

    /// The allowed age, seconds.
    pub fn max_age_secs(&self) -> f64 {
        self.max_age_ns as f64 / 1e9
    }

    /// Whether `permit` is still recent at `now`.
    pub fn fresh(&self, permit: &Permit, now: UtcNanos) -> Result<(), Refusal> {
        let age = now.as_nanos().saturating_sub(permit.time.as_nanos());
        if age.saturating_abs() > self.max_age_ns {
            return Err(Refusal::Stale {
                age_secs: age as f64 / 1e9,
                max_secs: self.max_age_secs(),
            });
        }
        Ok(())
    }

    /// Checks `payload` received on `topic` at `now`; on success it becomes the last
    /// accepted permit.
    pub fn accept(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: UtcNanos,
    ) -> Result<Permit, Refusal> {
        let p = verify(&self.key, topic, payload)?;
        self.fresh(&p, now)?;
        if let Some((last_boot, last_seq)) = self.last {
            if (p.boot_ns, p.seq) <= (last_boot, last_seq) {
                return Err(Refusal::Replayed {
                    boot_ns: p.boot_ns,
                    seq: p.seq,
                    last_boot,
                    last_seq,
                });
            }
        }
        self.last = Some((p.boot_ns, p.seq));
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOPIC: &str = "interlock/permits";
    const SEC: i64 = 1_000_000_000;

    fn key() -> PermitKey {
        PermitKey::from_text("0123456789abcdef0123456789abcdef").unwrap()
    }

    fn permit(lv_on: bool, time: i64, seq: u64) -> Permit {
        Permit {
            lv_on,
            reasons: if lv_on {
                vec![]
            } else {
                vec!["cooling: \"off\"\n".into()]
            },
            time: UtcNanos(time),
            boot_ns: 1000 * SEC,
            seq,
        }
    }

    fn bytes(j: &Json) -> Vec<u8> {
        j.to_string().into_bytes()
    }

    #[test]
    fn signed_permits_verify_and_round_trip() {
        let p = permit(false, 2000 * SEC, 7);
        let signed = sign(&key(), TOPIC, &p);
        assert_eq!(verify(&key(), TOPIC, &bytes(&signed)).unwrap(), p);
    }

    #[test]
    fn forged_or_foreign_permits_are_refused() {
        let p = permit(true, 2000 * SEC, 1);
        // Unsigned, as anyone with an MQTT account could publish it.
        let unsigned = br#"{"lv_on":true,"reasons":[]}"#;
        assert!(matches!(
            verify(&key(), TOPIC, unsigned),
            Err(Refusal::Malformed(_))
        ));
        // Another key.
        let other = PermitKey::from_text("another key, long enough").unwrap();
        let forged = sign(&other, TOPIC, &p);
        assert_eq!(
            verify(&key(), TOPIC, &bytes(&forged)),
            Err(Refusal::BadSignature)
        );
        // A real permit with a field changed.
        let mut tampered = sign(&key(), TOPIC, &permit(false, 2000 * SEC, 1));
        tampered["lv_on"] = json!(true);
        tampered["reasons"] = json!([]);
        assert_eq!(
            verify(&key(), TOPIC, &bytes(&tampered)),
            Err(Refusal::BadSignature)
        );
        // A real permit of another interlock.
        let theirs = sign(&key(), "other/permits", &p);
        assert_eq!(
            verify(&key(), TOPIC, &bytes(&theirs)),
            Err(Refusal::BadSignature)
        );
        // Garbage.
        assert!(verify(&key(), TOPIC, b"\xff\x00").is_err());
        assert!(verify(&key(), TOPIC, b"[true]").is_err());
    }

    #[test]
    fn stale_and_replayed_permits_are_refused() {
        let mut v = Verifier::new(key(), 30.0);
        let now = UtcNanos(2000 * SEC);
        let at = |t: i64, seq: u64, lv| bytes(&sign(&key(), TOPIC, &permit(lv, t, seq)));
        assert!(matches!(
            v.accept(TOPIC, &at(1960 * SEC, 1, true), now),
            Err(Refusal::Stale { .. })
        ));
        assert!(matches!(
            v.accept(TOPIC, &at(2040 * SEC, 1, true), now),
            Err(Refusal::Stale { .. })
        ));
        let yes = at(1995 * SEC, 5, true);
        assert!(v.accept(TOPIC, &yes, now).unwrap().lv_on);
        assert!(
            !v.accept(TOPIC, &at(1998 * SEC, 6, false), now)
                .unwrap()
                .lv_on
        );
        // The earlier "yes" again, still recent: a replay.
        assert!(matches!(
            v.accept(TOPIC, &yes, now),
            Err(Refusal::Replayed { .. })
        ));
        // A restarted interlock (later boot) starts its count again.
        let mut p = permit(true, 1999 * SEC, 0);
        p.boot_ns += SEC;
        assert!(v
            .accept(TOPIC, &bytes(&sign(&key(), TOPIC, &p)), now)
            .is_ok());
    }

    #[test]
    fn short_keys_are_refused_and_created_keys_are_private() {
        assert!(PermitKey::from_text("  short \n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/permit.key");
        let a = PermitKey::load_or_create(&path).unwrap();
        let b = PermitKey::load(&path).unwrap();
        assert_eq!(a.0, b.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(PermitKey::load(&dir.path().join("missing"))
            .unwrap_err()
            .contains("cannot read"));
    }

    proptest! {
        /// Whatever is published on the permit topic, a verifier only ever accepts
        /// permits the key signed, each newer than the one before.
        #[test]
        fn only_signed_in_sequence_permits_are_accepted(
            msgs in proptest::collection::vec(
                (any::<bool>(), any::<bool>(), 0u64..20, -40i64..40, proptest::collection::vec(any::<u8>(), 0..40)),
                1..40,
            )
        ) {
            let mut v = Verifier::new(key(), 30.0);
            let other = PermitKey::from_text("another key, long enough").unwrap();
            let now = UtcNanos(5000 * SEC);
            let mut last: Option<u64> = None;
            for (genuine, lv, seq, dt, junk) in msgs {
                let p = permit(lv, now.as_nanos() + dt * SEC, seq);
                let payload = match (genuine, junk.len() % 3) {
                    (true, _) => bytes(&sign(&key(), TOPIC, &p)),
                    (false, 0) => junk,
                    (false, _) => bytes(&sign(&other, TOPIC, &p)),
                };
                if let Ok(got) = v.accept(TOPIC, &payload, now) {
                    prop_assert!(genuine);
                    prop_assert!(dt.abs() <= 30);
                    prop_assert!(last.is_none_or(|l| got.seq > l));
                    last = Some(got.seq);
                }
            }
        }
    }
}
