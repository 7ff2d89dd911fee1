//! The interlock's say on LV on. With `safety.interlock` set, the FSM reads
//! `<interlock>/permits` (retained, signed: [`dcs_shared::permit`]) and
//! `<interlock>/online`, and refuses LV on unless the interlock is online and its last
//! valid, recent, in-sequence permit allows it: no word from the interlock, a forged,
//! replayed or stale permit are refusals, never a yes. No I/O but reading the key.

use std::path::PathBuf;

use dcs_shared::permit::{self, PermitKey, Verifier};
use dcs_shared::UtcNanos;

/// The last permit accepted, and why the last one received was not.
#[derive(Debug, Clone)]
pub struct Permit {
    interlock: Option<String>,
    key_file: Option<PathBuf>,
    max_age_secs: f64,
    verifier: Option<Verifier>,
    accepted: Option<permit::Permit>,
    /// Why the key could not be read, or the last permit was refused.
    problem: Option<String>,
    offline: bool,
}

impl Permit {
    /// For the interlock called `interlock` (`None`: no interlock, always allowed),
    /// verified with the key in `key_file` (or `$DCS_PERMIT_KEY`), read when the first
    /// permit arrives so that the FSM may start before the interlock creates it.
    pub fn new(interlock: Option<&str>, key_file: Option<PathBuf>, max_age_secs: f64) -> Self {
        Permit {
            interlock: interlock.map(str::to_string),
            key_file,
            max_age_secs,
            verifier: None,
            accepted: None,
            problem: None,
            offline: false,
        }
    }

    /// Topics to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        self.interlock
            .iter()
            .flat_map(|i| [format!("{i}/permits"), format!("{i}/online")])
            .collect()
    }

    /// Takes a message received at `now`; `true` if it was the interlock's.
    pub fn ingest(&mut self, topic: &str, payload: &[u8], now: UtcNanos) -> bool {
        let Some(i) = &self.interlock else {
            return false;
        };
        match topic.strip_prefix(i.as_str()) {
            Some("/online") => self.offline = payload == b"false",
            Some("/permits") => {
                if self.verifier.is_none() {
                    match PermitKey::from_env_or_file(self.key_file.as_deref(), false) {
                        Ok(k) => self.verifier = Some(Verifier::new(k, self.max_age_secs)),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot verify the interlock's permits: LV on is refused");
                            self.problem = Some(e);
                            return true;
                        }
                    }
                }
                let Some(v) = self.verifier.as_mut() else {
                    return true;
                };
                match v.accept(topic, payload, now) {
                    Ok(p) => {
                        tracing::info!(lv_on = p.lv_on, reasons = ?p.reasons, seq = p.seq, "interlock permit");
                        self.accepted = Some(p);
                        self.problem = None;
                    }
                    // The retained copy of the permit already accepted, delivered again
                    // after a reconnect: nothing new, nothing wrong.
                    Err(permit::Refusal::Replayed {
                        boot_ns,
                        seq,
                        last_boot,
                        last_seq,
                    }) if (boot_ns, seq) == (last_boot, last_seq) => {
                        tracing::debug!(seq, "interlock permit delivered again");
                    }
                    Err(e) => {
                        // A retained permit from before a restart is merely old; anything
                        // else is someone publishing permits who should not.
                        if matches!(e, permit::Refusal::Stale { .. }) {
                            tracing::info!(reason = %e, "interlock permit ignored");
                        } else {
                            tracing::warn!(reason = %e, "interlock permit refused");
                        }
                        self.problem = Some(format!("the last permit on {topic} was refused: {e}"));
                    }
                }
            }
            _ => return false,
        }
        true
    }

    /// Whether LV may be switched on at `now`, with the refusal an operator can act on.
    pub fn check_lv_on(&self, now: UtcNanos) -> Result<(), String> {
        let Some(i) = &self.interlock else {
            return Ok(());
        };
        if self.offline {
            return Err(format!(
                "LV on refused: the interlock `{i}` is offline ({i}/online = false); start it \
                 (or remove safety.interlock from this FSM's config). Nothing was changed"
            ));
        }
        let problem = self
            .problem
            .as_ref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        let Some(p) = &self.accepted else {
            return Err(format!(
                "LV on refused: no valid permit from the interlock yet ({i}/permits){problem}; \
                 is `{i}` running with the same permit key? Nothing was changed"
            ));
        };
        if let Some(e) = self.verifier.as_ref().and_then(|v| v.fresh(p, now).err()) {
            return Err(format!(
                "LV on refused: the interlock's last valid permit is {e}{problem}; is `{i}` \
                 running? Nothing was changed"
            ));
        }
        if !p.lv_on {
            return Err(format!(
                "LV on refused by the interlock: {}{problem}. Nothing was changed",
                if p.reasons.is_empty() {
                    "no reason given".to_string()
                } else {
                    p.reasons.join("; ")
                }
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;

    fn signed(key: &PermitKey, lv_on: bool, time: i64, seq: u64, reasons: &[&str]) -> Vec<u8> {
        let p = permit::Permit {
            lv_on,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            time: UtcNanos(time),
            boot_ns: 1,
            seq,
        };
        permit::sign(key, "interlock/permits", &p)
            .to_string()
            .into_bytes()
    }

    #[test]
    fn only_a_valid_recent_permit_allows_lv_on() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("permit.key");
        assert!(Permit::new(None, None, 30.0)
            .check_lv_on(UtcNanos(0))
            .is_ok());
        let mut p = Permit::new(Some("interlock"), Some(file.clone()), 30.0);
        let now = 1000 * SEC;
        let t = UtcNanos(now);
        assert!(p.check_lv_on(t).unwrap_err().contains("no valid permit"));
        // The key does not exist yet: refused, and said so.
        assert!(p.ingest("interlock/permits", br#"{"lv_on": true, "reasons": []}"#, t));
        assert!(p
            .check_lv_on(t)
            .unwrap_err()
            .contains("cannot read the permit key"));
        let key = PermitKey::load_or_create(&file).unwrap();
        // Unsigned (anyone with an account could publish it): refused.
        p.ingest("interlock/permits", br#"{"lv_on": true, "reasons": []}"#, t);
        let e = p.check_lv_on(t).unwrap_err();
        assert!(
            e.contains("no valid permit") && e.contains("not a permit"),
            "{e}"
        );
        // Signed with another key: refused.
        let other = PermitKey::from_text("somebody else's key").unwrap();
        p.ingest("interlock/permits", &signed(&other, true, now, 1, &[]), t);
        assert!(p.check_lv_on(t).unwrap_err().contains("bad signature"));
        // Genuine.
        let yes = signed(&key, true, now, 1, &[]);
        p.ingest("interlock/permits", &yes, t);
        assert!(p.check_lv_on(t).is_ok());
        let no = signed(&key, false, now + SEC, 2, &["cooling: cooling required"]);
        p.ingest("interlock/permits", &no, t);
        let e = p.check_lv_on(t).unwrap_err();
        assert!(
            e.contains("refused by the interlock: cooling: cooling required"),
            "{e}"
        );
        // The earlier "yes" replayed: refused, the "no" stands.
        p.ingest("interlock/permits", &yes, t);
        let e = p.check_lv_on(t).unwrap_err();
        assert!(
            e.contains("refused by the interlock") && e.contains("replayed"),
            "{e}"
        );
        // A yes nobody re-signs goes stale.
        p.ingest(
            "interlock/permits",
            &signed(&key, true, now + 2 * SEC, 3, &[]),
            t,
        );
        assert!(p.check_lv_on(t).is_ok());
        let e = p.check_lv_on(UtcNanos(now + 40 * SEC)).unwrap_err();
        assert!(e.contains("stale"), "{e}");
        // Garbage is refused and changes nothing.
        p.ingest("interlock/permits", b"{}garbage", t);
        assert!(p.check_lv_on(t).is_ok());
        p.ingest("interlock/online", b"false", t);
        assert!(p.check_lv_on(t).unwrap_err().contains("offline"));
        assert!(!p.ingest("julabo/status", b"{}", t));
    }
}
