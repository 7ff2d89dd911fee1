//! A notification as people read it: an e-mail subject and body, a chat line, a JSON
//! body. Every message says the station, what it is about, the values, the time in UTC
//! and local time, and what to do. No I/O.

use chrono::{DateTime, Local, Utc};
use serde_json::{json, Value as Json};

use crate::engine::{Kind, Notification};

/// `2026-12-07 17:20:05 UTC (18:20:05 CET local)`.
pub fn when(at_ns: i64) -> String {
    let utc: DateTime<Utc> = DateTime::from_timestamp_nanos(at_ns);
    let local = utc.with_timezone(&Local);
    format!(
        "{} UTC ({} local)",
        utc.format("%Y-%m-%d %H:%M:%S"),
        local.format("%Y-%m-%d %H:%M:%S %Z")
    )
}

/// One line: `[box1] RAISED critical dew_point: ...`.
pub fn subject(n: &Notification) -> String {
    format!(
        "[{}] {} {}: {}",
        n.station,
        n.kind.as_str(),
        n.severity.as_str(),
        n.summary
    )
}

fn what_to_do(n: &Notification) -> String {
    if let Some(a) = n
        .details
        .get("advice")
        .and_then(Json::as_str)
        .filter(|_| !matches!(n.kind, Kind::Shelved))
    {
        return a.to_string();
    }
    match n.kind {
        Kind::Raised | Kind::Escalated | Kind::Reminder => {
            "Check the lab: the interlock acts by itself, but someone must find the cause, then acknowledge the alarm (alarms/cmd/ack) with your name.".into()
        }
        Kind::Acknowledged => "Someone is on it; nothing to do unless they ask.".into(),
        Kind::Cleared => "Nothing: the condition is normal again. Power is not restored automatically.".into(),
        Kind::Watchdog => format!(
            "The safety chain cannot be trusted while {} is away: check it now (dcs up, podman pod ps); keep modules unpowered until it is back.",
            n.subject_of
        ),
        Kind::Back => "Nothing: it is back. Check that no alarm was missed meanwhile.".into(),
        Kind::Folded => "Many notifications at once: open the alarm summary (alarms/summary, the control panel).".into(),
        Kind::Shelved => "Nothing is told of this alarm until the shelve ends; the interlock still acts on it. Unshelve early with alarms/cmd/unshelve.".into(),
        Kind::Unshelved => "Notifications of this alarm resume: if it is still active, find the cause and acknowledge it.".into(),
        Kind::Daily => "Nothing, if all is quiet; otherwise look at what is open (alarms/summary, the control panel).".into(),
    }
}

/// The plain-text body (e-mail, and the chat message's text).
pub fn text(n: &Notification) -> String {
    let mut out = format!(
        "Station: {}\nEvent: {} ({})\nAbout: {}\nWhen: {}\n\n{}\n",
        n.station,
        n.kind.as_str(),
        n.severity.as_str(),
        n.subject_of,
        when(n.at_ns),
        n.summary
    );
    let d = &n.details;
    if let Some(m) = d.get("message").and_then(Json::as_str) {
        out.push_str(&format!("\nCondition: {m}\n"));
    }
    if let Some(v) = d
        .get("values")
        .and_then(Json::as_object)
        .filter(|v| !v.is_empty())
    {
        out.push_str("\nValues:\n");
        for (k, x) in v {
            out.push_str(&format!("  {k} = {x}\n"));
        }
    }
    if let Some(acts) = d
        .get("actions")
        .and_then(Json::as_array)
        .filter(|a| !a.is_empty())
    {
        out.push_str("\nActions of the interlock:\n");
        for a in acts {
            let f = |k: &str| a.get(k).and_then(Json::as_str).unwrap_or("").to_string();
            out.push_str(&format!("  {} at {}: {}\n", f("do"), f("at"), f("result")));
        }
    }
    if let Some(by) = d.get("acknowledged_by").and_then(Json::as_str) {
        out.push_str(&format!("\nAcknowledged by: {by}\n"));
    }
    if let Some(s) = d.get("shelved").filter(|s| s.is_object()) {
        let f = |k: &str| s.get(k).and_then(Json::as_str).unwrap_or("?").to_string();
        out.push_str(&format!(
            "\nShelved by {} until {}: {}\n",
            f("by"),
            f("until"),
            f("reason")
        ));
    }
    if let Some(list) = d
        .get("alarms")
        .and_then(Json::as_array)
        .filter(|_| n.kind != Kind::Daily)
    {
        out.push_str("\nStill active:\n");
        for l in list {
            out.push_str(&format!("  {}\n", l.as_str().unwrap_or("")));
        }
    }
    if let Some(list) = d.get("notifications").and_then(Json::as_array) {
        out.push_str("\nFolded:\n");
        for l in list {
            out.push_str(&format!("  {}\n", l.as_str().unwrap_or("")));
        }
    }
    out.push_str(&format!("\nWhat to do: {}\n", what_to_do(n)));
    out
}

/// Mattermost/Slack: `{"text": ...}` (the subject in bold, then the body).
pub fn mattermost(n: &Notification) -> Json {
    json!({ "text": format!("**{}**\n{}", subject(n), text(n)) })
}

/// The generic JSON body: the notification's fields, the times and the advice.
pub fn generic(n: &Notification) -> Json {
    json!({
        "station": n.station,
        "kind": n.kind,
        "severity": n.severity,
        "about": n.subject_of,
        "summary": n.summary,
        "details": n.details,
        "time_ns": n.at_ns,
        "time": when(n.at_ns),
        "what_to_do": what_to_do(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Severity;

    #[test]
    fn every_message_says_station_time_values_and_what_to_do() {
        let n = Notification {
            kind: Kind::Raised,
            severity: Severity::Critical,
            station: "burnin-1".into(),
            subject_of: "dew_point".into(),
            summary: "dew_point: margin 1.2 degC".into(),
            details: json!({"message": "margin 1.2 degC", "values": {"bath_temp": 4.5}, "advice": "Dry the box."}),
            at_ns: 1_796_660_727_000_000_000,
        };
        let t = text(&n);
        assert!(t.contains("Station: burnin-1"), "{t}");
        assert!(t.contains("bath_temp = 4.5"), "{t}");
        assert!(t.contains("UTC (") && t.contains("local)"), "{t}");
        assert!(t.contains("What to do: Dry the box."), "{t}");
        assert_eq!(
            subject(&n),
            "[burnin-1] RAISED critical: dew_point: margin 1.2 degC"
        );
        assert!(mattermost(&n)["text"]
            .as_str()
            .unwrap()
            .starts_with("**[burnin-1] RAISED"));
        assert_eq!(generic(&n)["kind"], "raised");
        assert_eq!(generic(&n)["what_to_do"], "Dry the box.");
    }
}
