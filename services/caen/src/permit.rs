//! The interlock's say on LV on. With `safety.interlock` set, the FSM reads
//! `<interlock>/permits` (retained, `{"lv_on": bool, "reasons": [...]}`) and
//! `<interlock>/online`, and refuses LV on unless the interlock is online and its last
//! permit allows it: no word from the interlock is a refusal, never a yes. No I/O.

use serde_json::Value as Json;

/// The last permit received.
#[derive(Debug, Clone, Default)]
pub struct Permit {
    interlock: Option<String>,
    lv_on: Option<bool>,
    reasons: Vec<String>,
    offline: bool,
}

impl Permit {
    /// For the interlock called `interlock`; `None` means no interlock (always allowed).
    pub fn new(interlock: Option<&str>) -> Self {
        Permit {
            interlock: interlock.map(str::to_string),
            ..Default::default()
        }
    }

    /// Topics to subscribe to.
    pub fn filters(&self) -> Vec<String> {
        self.interlock
            .iter()
            .flat_map(|i| [format!("{i}/permits"), format!("{i}/online")])
            .collect()
    }

    /// Takes a message; `true` if it was the interlock's.
    pub fn ingest(&mut self, topic: &str, payload: &[u8]) -> bool {
        let Some(i) = &self.interlock else {
            return false;
        };
        match topic.strip_prefix(i.as_str()) {
            Some("/online") => self.offline = payload == b"false",
            Some("/permits") => {
                let doc = serde_json::from_slice::<Json>(payload).unwrap_or(Json::Null);
                // Anything unreadable is a refusal.
                self.lv_on = Some(doc.get("lv_on").and_then(Json::as_bool).unwrap_or(false));
                self.reasons = doc
                    .get("reasons")
                    .and_then(Json::as_array)
                    .map(|r| {
                        r.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                tracing::info!(lv_on = self.lv_on, reasons = ?self.reasons, "interlock permit");
            }
            _ => return false,
        }
        true
    }

    /// Whether LV may be switched on, with the refusal an operator can act on.
    pub fn check_lv_on(&self) -> Result<(), String> {
        let Some(i) = &self.interlock else {
            return Ok(());
        };
        if self.offline {
            return Err(format!(
                "LV on refused: the interlock `{i}` is offline ({i}/online = false); start it \
                 (or remove safety.interlock from this FSM's config). Nothing was changed"
            ));
        }
        match self.lv_on {
            None => Err(format!(
                "LV on refused: no permit from the interlock yet ({i}/permits); is `{i}` \
                 running? Nothing was changed"
            )),
            Some(false) => Err(format!(
                "LV on refused by the interlock: {}. Nothing was changed",
                if self.reasons.is_empty() {
                    "no reason given".to_string()
                } else {
                    self.reasons.join("; ")
                }
            )),
            Some(true) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_word_is_a_refusal() {
        assert!(Permit::new(None).check_lv_on().is_ok());
        let mut p = Permit::new(Some("interlock"));
        assert!(p.check_lv_on().unwrap_err().contains("no permit"));
        assert!(p.ingest("interlock/permits", br#"{"lv_on": true, "reasons": []}"#));
        assert!(p.check_lv_on().is_ok());
        p.ingest(
            "interlock/permits",
            br#"{"lv_on": false, "reasons": ["cooling: cooling required: the chiller is not known to be running"]}"#,
        );
        let e = p.check_lv_on().unwrap_err();
        assert!(
            e.contains("refused by the interlock: cooling: cooling required"),
            "{e}"
        );
        p.ingest("interlock/permits", b"{}garbage");
        assert!(p.check_lv_on().is_err());
        p.ingest("interlock/permits", br#"{"lv_on": true}"#);
        p.ingest("interlock/online", b"false");
        assert!(p.check_lv_on().unwrap_err().contains("offline"));
        assert!(!p.ingest("julabo/status", b"{}"));
    }
}
