//! The notifier against real receivers (aiosmtpd's SMTP server, an http.server webhook
//! receiver) and the real interlock: a dew-point alarm raised, escalated, acknowledged
//! and cleared, one message each per channel; a reminder; the SMTP server down while an
//! alarm is raised (delivered once it is back, once); a flood folded into a summary;
//! the interlock SIGKILLed (the watchdog tells). Shelving: bad commands refused, a
//! shelved alarm's notifications held while the interlock still acts, the shelve's end
//! told. The journal: in the notifier's file and in a MongoDB-wire server (SecantusDB),
//! read back with `dcs alarms log`.
//!
//! Stand-ins, named as such: the test publishes the chiller's and the CAEN channel's
//! status (`julabo/status`, `dcs/channels/0`) so that the interlock's actions are
//! confirmed, and, for the flood, alarm payloads as the interlock publishes them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dcs_integration_tests::db::Mongo;
use dcs_integration_tests::{
    bin, free_port, repo_root, spawn_until, Broker, BrokerKind, Observer, Proc, PASS, USER,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn peer(mode: &str, port: u16) -> Proc {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        ".venv missing: run .ci/run (it installs aiosmtpd)"
    );
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("tests/interop/notify_peers.py"))
        .arg(mode)
        .arg(port.to_string());
    spawn_until(cmd, "ready", WAIT)
}

/// What a receiver got so far, one JSON object per message.
fn received(p: &Proc) -> Vec<Value> {
    p.stderr_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Waits until `p` received messages satisfying `pred` (on the whole list).
fn wait_received(p: &Proc, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = received(p);
        if pred(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "{what}: got {got:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn subjects(got: &[Value]) -> Vec<String> {
    got.iter()
        .map(|m| {
            m["subject"]
                .as_str()
                .map(String::from)
                .or_else(|| {
                    m["body"]["text"]
                        .as_str()
                        .map(|t| t.lines().next().unwrap_or("").to_string())
                })
                .unwrap_or_default()
        })
        .collect()
}

fn count(got: &[Value], word: &str) -> usize {
    subjects(got).iter().filter(|s| s.contains(word)).count()
}

/// Messages of one kind (`SHELVED` is not `UNSHELVED`): the subject is
/// `[station] KIND severity: ...`.
fn count_kind(got: &[Value], kind: &str) -> usize {
    count(got, &format!("] {kind} "))
}

fn write(dir: &Path, name: &str, text: String) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `dcs alarms log --json` with a stack config naming `notifier_cfg`, and the args.
fn alarms_log(dir: &Path, notifier_cfg: &Path, args: &[&str]) -> Vec<Value> {
    let stack = write(
        dir,
        "stack.yaml",
        format!(
            "services:\n  notifier: {{config: {}}}\n",
            notifier_cfg.display()
        ),
    );
    let out = Command::new(bin("dcs"))
        .args(["alarms", "log", "--json", "--config"])
        .arg(&stack)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Acknowledges the dew-point alarm as `ana`; the interlock must accept it.
async fn ack_as_ana(o: &mut Observer) {
    let r = o
        .command(
            "alarms",
            "ack",
            r#"{"rule": "dew_point", "operator": "ana"}"#,
            WAIT,
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
}

/// The journal's events, in order.
fn events(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

/// The common rig: an interlock with one dew-point rule (set-point 20, then HV off
/// `hv_after` s later; `confirm` s to confirm each), a notifier with `notifier_body`
/// (its YAML without `station`, `state_dir` and `mqtt`), and the stand-ins: a chiller
/// at set-point 5 and one channel with HV on, dry. Returns once the interlock has
/// published its alarm (after its restore window).
struct Rig {
    o: Observer,
    interlock: Proc,
    notifier: Proc,
    notifier_cfg: PathBuf,
}

fn chiller(sp: f64) -> String {
    format!(r#"{{"internal_temp":10.0,"setpoint_1":{sp},"used_setpoint":1}}"#)
}

async fn rig(d: &Path, broker: &Broker, rule_extra: &str, notifier_body: &str) -> Rig {
    let mqtt = format!(
        "mqtt: {{url: {}, username: {USER}, password: {PASS}}}\n",
        broker.url()
    );
    let interlock_cfg = write(
        d,
        "interlock.yaml",
        format!(
            "name: interlock\npermit_key_file: permit.key\ntargets: {{caen: dcs, chiller: julabo, max_age_secs: 60}}\n\
             inputs:\n  bath: {{topic: julabo/status, field: internal_temp, max_age_secs: 600}}\n  \
             dew: {{topic: ESP01/sensors/BME/dew, max_age_secs: 600}}\n\
             rules:\n  dew_point:\n    kind: dew_point\n    cold: [bath]\n    dew: [dew]\n    margin: 3\n\
             {rule_extra}{mqtt}"
        ),
    );
    let notifier_cfg = write(
        d,
        "notifier.yaml",
        format!("station: test-box\nstate_dir: state\n{notifier_body}{mqtt}"),
    );
    let mut o = Observer::connect(
        broker.port,
        "t-notify",
        &["julabo/cmd/#", "dcs/cmd/#", "alarms/#"],
    )
    .await;
    o.publish_acked("julabo/status", true, &chiller(5.0)).await;
    o.publish_acked(
        "dcs/channels/0",
        true,
        r#"{"module":"m0","lv_status":1,"hv_status":1}"#,
    )
    .await;
    o.publish_acked("ESP01/sensors/BME/dew", true, "0.5").await;
    let mut cmd = Command::new(bin("interlock"));
    cmd.arg("--config").arg(&interlock_cfg);
    let interlock = spawn_until(cmd, "connected to MQTT broker", WAIT);
    let mut cmd = Command::new(bin("notifier"));
    cmd.arg("--config").arg(&notifier_cfg);
    let notifier = spawn_until(cmd, "connected to MQTT broker", WAIT);
    o.wait_for("alarms/dew_point", WAIT, |_| true)
        .await
        .expect("the interlock publishes alarms/dew_point after its restore window");
    Rig {
        o,
        interlock,
        notifier,
        notifier_cfg,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_reach_people_once_each_through_outages_floods_and_a_dead_interlock() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Broker::start(BrokerKind::Dcs);
    let (smtp_port, http_port) = (free_port(), free_port());
    let mut smtp = peer("smtp", smtp_port);
    let hook = peer("http", http_port);
    let Rig {
        mut o,
        mut interlock,
        notifier,
        notifier_cfg,
    } = rig(
        d,
        &broker,
        "    actions: [{do: chiller_setpoint, temp: 20}, {do: hv_off, after_secs: 1}]\n    \
         confirm_timeout_secs: 20\n    advice: Check the dry air; do not open the box.\n",
        &format!(
            "watch: [dcs]\n\
             timing: {{reminder_secs: 4, interlock_silence_secs: 120, offline_grace_secs: 1}}\n\
             channels:\n  - name: mail\n    max_per_window: 5\n    rate_window_secs: 10\n    \
             email: {{host: 127.0.0.1, port: {smtp_port}, security: none, from: dcs@lab.invalid, to: [shift@lab.invalid], timeout_secs: 2}}\n  \
             - name: chat\n    max_per_window: 5\n    rate_window_secs: 10\n    \
             webhook: {{url: 'http://127.0.0.1:{http_port}/hooks/dcs', format: mattermost}}\n"
        ),
    )
    .await;

    // Wet: raised; the interlock raises the set-point (confirmed by the stand-in),
    // then switches HV off (confirmed): one escalation message.
    let t_raise = Instant::now();
    o.publish_acked("ESP01/sensors/BME/dew", true, "9.0").await;
    o.wait_for("julabo/cmd/setWT", WAIT, |_| true)
        .await
        .expect("the interlock raises the set-point");
    o.publish_acked("julabo/status", true, &chiller(20.0)).await;
    o.wait_for("dcs/cmd/switch/hv", WAIT, |_| true)
        .await
        .expect("the interlock switches HV off");
    o.publish_acked(
        "dcs/channels/0",
        true,
        r#"{"module":"m0","lv_status":1,"hv_status":0}"#,
    )
    .await;
    // Each action's result is told once: the set-point's and HV off's (one message
    // each, or one for both if they settled together).
    let told = |g: &[Value], what: &str| {
        subjects(g)
            .iter()
            .filter(|s| s.contains("ESCALATED"))
            .map(|s| s.matches(what).count())
            .sum::<usize>()
    };
    let mails = wait_received(&smtp, "raised and escalated by mail", |g| {
        told(g, "hv_off: confirmed") == 1 && told(g, "chiller_setpoint: confirmed") == 1
    });
    let raise_ms = t_raise.elapsed().as_millis();
    let raised = &mails[0];
    let s = raised["subject"].as_str().unwrap();
    assert!(
        s.starts_with("[test-box] RAISED critical: dew_point"),
        "{s}"
    );
    let body = raised["body"].as_str().unwrap();
    for needle in [
        "Station: test-box",
        "UTC (",
        "local)",
        "What to do: Check the dry air",
        "Values:",
    ] {
        assert!(body.contains(needle), "`{needle}` missing in\n{body}");
    }
    assert_eq!(raised["to"][0], "shift@lab.invalid");
    let escalations = count(&mails, "ESCALATED");
    // A reminder while nobody acknowledges (4 s in this test, an hour shipped).
    wait_received(&smtp, "a reminder", |g| count(g, "STILL ACTIVE") >= 1);
    ack_as_ana(&mut o).await;
    wait_received(&smtp, "acknowledged", |g| count(g, "ACKNOWLEDGED") == 1);
    o.publish_acked("ESP01/sensors/BME/dew", true, "0.5").await;
    let mails = wait_received(&smtp, "cleared", |g| count(g, "CLEARED") == 1);
    for word in ["RAISED", "ACKNOWLEDGED", "CLEARED"] {
        assert_eq!(count(&mails, word), 1, "{word}: {:#?}", subjects(&mails));
    }
    assert_eq!(
        count(&mails, "ESCALATED"),
        escalations,
        "{:#?}",
        subjects(&mails)
    );
    assert_eq!(told(&mails, "hv_off"), 1);
    assert!(mails
        .iter()
        .any(|m| m["body"].as_str().unwrap().contains("Acknowledged by: ana")));
    let hooks = wait_received(&hook, "the same on the webhook", |g| {
        count(g, "CLEARED") == 1
    });
    for word in ["RAISED", "ACKNOWLEDGED", "CLEARED"] {
        assert_eq!(count(&hooks, word), 1, "{word}: {:#?}", subjects(&hooks));
    }
    assert_eq!(told(&hooks, "hv_off: confirmed"), 1);
    assert_eq!(told(&hooks, "chiller_setpoint: confirmed"), 1);
    assert_eq!(hooks[0]["path"], "/hooks/dcs");

    // The mail server down while an alarm is raised: the chat has it at once, the mail
    // once the server is back, exactly once. (The window of 10 s lets it through.)
    tokio::time::sleep(Duration::from_secs(10)).await;
    smtp.kill();
    let before = received(&smtp).len();
    o.publish_acked("ESP01/sensors/BME/dew", true, "9.5").await;
    wait_received(&hook, "raised again on the webhook", |g| {
        count(g, "RAISED") == 2
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let smtp = peer("smtp", smtp_port);
    let back = wait_received(&smtp, "the queued mail after the outage", |g| {
        count(g, "RAISED") >= 1
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(&received(&smtp), "RAISED"),
        1,
        "{:#?} (before: {before})",
        subjects(&back)
    );

    // Dry again and acknowledged: no reminders in what follows.
    o.publish_acked("ESP01/sensors/BME/dew", true, "0.5").await;
    ack_as_ana(&mut o).await;
    wait_received(&hook, "cleared again", |g| count(g, "CLEARED") == 2);

    // A flood of 200 alarm events in a second (as the interlock would publish them):
    // a bounded number of messages and one summary with the count.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let hooks_before = received(&hook).len();
    for i in 0..200 {
        let p = format!(
            r#"{{"rule":"flood_{i}","severity":"warning","state":"active","message":"test flood","values":{{}},"actions":[]}}"#
        );
        o.publish(&format!("alarms/flood_{i}"), p).await;
    }
    let flood = wait_received(&hook, "the folded summary", |g| {
        count(&g[hooks_before..], "FOLDED") == 1
    });
    let flood = &flood[hooks_before..];
    let raised = count(flood, "RAISED");
    assert!(raised <= 5, "{raised} messages for the flood");
    let summary = flood
        .iter()
        .find(|m| m["body"]["text"].as_str().unwrap_or("").contains("FOLDED"))
        .unwrap();
    let text = summary["body"]["text"].as_str().unwrap();
    // Every flood event is either sent or counted; the grouped reminders of the flood's
    // alarms (one message per 4 s round here, more rounds on a slow machine) may be
    // folded with them.
    let folded: usize = text
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or(0);
    assert!(
        raised + folded >= 200 && folded <= 200 - raised + 20,
        "{raised} sent, {folded} folded:\n{text}"
    );

    // The interlock killed: its last will, then the watchdog's notice.
    let t_kill = Instant::now();
    interlock.kill();
    let w = wait_received(&hook, "the watchdog", |g| count(g, "WATCHDOG") == 1);
    let watchdog_ms = t_kill.elapsed().as_millis();
    assert!(
        subjects(&w)
            .iter()
            .any(|s| s.contains("interlock") && s.contains("offline")),
        "{:#?}",
        subjects(&w)
    );
    println!("alarm -> mail and webhook: {raise_ms} ms (incl. the escalation); kill -> watchdog notice: {watchdog_ms} ms");
    drop(notifier);

    // The journal (a file: no database here) has it all, with who and when.
    let j = alarms_log(d, &notifier_cfg, &["--rule", "dew_point", "--limit", "0"]);
    let ev = events(&j);
    for (event, n) in [
        ("raised", 2),
        ("escalated", 1),
        ("acknowledged", 2),
        ("cleared", 2),
    ] {
        assert!(
            ev.iter().filter(|e| *e == event).count() >= n,
            "{event} x{n} in {ev:?}"
        );
    }
    let ack = j.iter().find(|e| e["event"] == "acknowledged").unwrap();
    assert_eq!(ack["by"], "ana");
    assert!(ack["at_ns"].as_i64().unwrap() > 1_700_000_000_000_000_000);
    assert!(ev.iter().any(|e| e == "notification_sent"), "{ev:?}");
    assert!(
        j.iter()
            .any(|e| e["event"] == "notification_failed" && e["details"]["channel"] == "mail"),
        "the mail outage is journaled: {ev:?}"
    );
    let all = alarms_log(d, &notifier_cfg, &["--limit", "0"]);
    assert!(all
        .iter()
        .any(|e| e["event"] == "watchdog" && e["subject"] == "interlock"));
    let recent = alarms_log(d, &notifier_cfg, &["--since", "1s", "--limit", "0"]);
    assert!(recent.len() < all.len(), "--since filters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shelved_alarm_tells_nobody_but_the_interlock_still_acts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Broker::start(BrokerKind::Dcs);
    let mongo = Mongo::start();
    let http_port = free_port();
    let hook = peer("http", http_port);
    let mongo_uri = format!("mongodb://127.0.0.1:{}", mongo.port);
    let Rig {
        mut o,
        interlock: _interlock,
        notifier,
        notifier_cfg,
    } = rig(
        d,
        &broker,
        "    actions: [{do: chiller_setpoint, temp: 20}, {do: hv_off, after_secs: 4}]\n    \
         confirm_timeout_secs: 5\n",
        &format!(
            "timing: {{reminder_secs: 3, interlock_silence_secs: 120, offline_grace_secs: 1}}\n\
             journal: {{mongodb_uri: '{mongo_uri}', collection: journal_test}}\n\
             channels:\n  - name: chat\n    max_per_window: 100\n    \
             webhook: {{url: 'http://127.0.0.1:{http_port}/hooks/dcs', format: mattermost}}\n"
        ),
    )
    .await;

    // Bad shelve commands: refused with the reason, nothing shelved.
    for (payload, why) in [
        (
            r#"{"rule": "nope", "minutes": 5, "by": "ana", "reason": "x"}"#,
            "no rule `nope`",
        ),
        (
            r#"{"rule": "dew_point", "minutes": 5000, "by": "ana", "reason": "x"}"#,
            "at most 1440",
        ),
        (
            r#"{"rule": "dew_point", "minutes": 5, "by": "ana"}"#,
            "reason",
        ),
        (
            r#"{"rule": "dew_point", "minutes": 5, "by": "ana", "reason": ""}"#,
            "`reason` must not be empty",
        ),
        (
            r#"{"rule": "dew_point", "minutes": 0, "by": "ana", "reason": "x"}"#,
            "above 0",
        ),
    ] {
        let r = o.command("alarms", "shelve", payload, WAIT).await;
        assert_eq!(r["ok"], false, "{payload}: {r}");
        assert!(r["error"].as_str().unwrap().contains(why), "{payload}: {r}");
    }
    let r = o
        .command(
            "alarms",
            "unshelve",
            r#"{"rule": "dew_point", "by": "ana"}"#,
            WAIT,
        )
        .await;
    assert!(r["error"].as_str().unwrap().contains("not shelved"), "{r}");
    // Nothing shelved: no alarm document says so (the refusals published none).
    let shelved = o
        .wait_for("alarms/dew_point", Duration::from_secs(2), |p| {
            serde_json::from_str::<Value>(p).is_ok_and(|a| !a["shelved"].is_null())
        })
        .await;
    assert!(shelved.is_none(), "a refused shelve changed the alarm");

    // Raised and told; then shelved for 30 s by ana.
    o.publish_acked("ESP01/sensors/BME/dew", true, "9.0").await;
    o.wait_for("julabo/cmd/setWT", WAIT, |_| true)
        .await
        .expect("the interlock raises the set-point");
    wait_received(&hook, "raised", |g| count(g, "RAISED") == 1);
    let r = o
        .command(
            "alarms",
            "shelve",
            r#"{"rule": "dew_point", "minutes": 0.5, "by": "ana", "reason": "dry-air line swapped"}"#,
            WAIT,
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let a = o
        .wait_json("alarms/dew_point", WAIT, "shelved alarm", |a| {
            a["shelved"].is_object()
        })
        .await;
    assert_eq!(a["shelved"]["by"], "ana");
    assert_eq!(a["state"], "active");
    let s = o
        .wait_json("alarms/summary", WAIT, "summary", |s| {
            s["shelved"]["dew_point"].is_object()
        })
        .await;
    assert_eq!(s["shelved"]["dew_point"]["reason"], "dry-air line swapped");
    wait_received(&hook, "the shelve told", |g| count_kind(g, "SHELVED") == 1);
    let t_shelved = Instant::now();

    // Worse while shelved: the interlock still acts (the set-point is not confirmed
    // within 5 s: HV off), and nobody is told.
    o.publish_acked("ESP01/sensors/BME/dew", true, "12.0").await;
    o.wait_for("dcs/cmd/switch/hv", WAIT, |_| true)
        .await
        .expect("the interlock switches HV off although the alarm is shelved");
    o.publish_acked(
        "dcs/channels/0",
        true,
        r#"{"module":"m0","lv_status":1,"hv_status":0}"#,
    )
    .await;
    // Until the shelve expires (30 s): no escalation, no reminder (every 3 s here).
    while t_shelved.elapsed() < Duration::from_secs(26) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let held = received(&hook);
    assert_eq!(
        (count(&held, "ESCALATED"), count(&held, "STILL ACTIVE")),
        (0, 0),
        "{held:#?}"
    );
    // The end is told, with the alarm's state; reminders resume.
    let got = wait_received(&hook, "the shelve's end", |g| {
        count_kind(g, "UNSHELVED") == 1
    });
    let end = subjects(&got)
        .into_iter()
        .find(|s| s.contains("UNSHELVED"))
        .unwrap();
    assert!(
        end.contains("shelve expired") && end.contains("active"),
        "{end}"
    );
    wait_received(&hook, "a reminder after the shelve", |g| {
        count(g, "STILL ACTIVE") == 1
    });

    // Shelved again and unshelved by someone else: told with the name.
    let r = o
        .command(
            "alarms",
            "shelve",
            r#"{"rule": "dew_point", "minutes": 60, "by": "ana", "reason": "night"}"#,
            WAIT,
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    wait_received(&hook, "shelved again", |g| count_kind(g, "SHELVED") == 2);
    let r = o
        .command(
            "alarms",
            "unshelve",
            r#"{"rule": "dew_point", "by": "bo"}"#,
            WAIT,
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let got = wait_received(&hook, "unshelved by bo", |g| {
        count_kind(g, "UNSHELVED") == 2
    });
    assert!(subjects(&got).iter().any(|s| s.contains("unshelved by bo")));
    ack_as_ana(&mut o).await;
    wait_received(&hook, "acknowledged", |g| count(g, "ACKNOWLEDGED") == 1);

    // The journal in MongoDB: everything, told or not, with who.
    let deadline = Instant::now() + WAIT;
    let j = loop {
        let j = alarms_log(d, &notifier_cfg, &["--rule", "dew_point", "--limit", "0"]);
        if events(&j).iter().any(|e| e == "acknowledged") || Instant::now() > deadline {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // (Escalations in a row as one: each action's result is an entry.)
    let mut ev: Vec<String> = events(&j)
        .into_iter()
        .filter(|e| !e.starts_with("notification_"))
        .collect();
    ev.dedup();
    assert_eq!(
        ev,
        [
            "raised",
            "shelved",
            "escalated",
            "shelve_expired",
            "shelved",
            "unshelved",
            "acknowledged"
        ],
        "{j:#?}"
    );
    let by: Vec<&str> = j
        .iter()
        .filter(|e| {
            matches!(
                e["event"].as_str(),
                Some("shelved" | "unshelved" | "acknowledged")
            )
        })
        .map(|e| e["by"].as_str().unwrap())
        .collect();
    assert_eq!(by, ["ana", "ana", "bo", "ana"]);
    assert!(j.iter().any(|e| e["event"] == "notification_sent"));
    drop(notifier);
    drop(mongo);
}
