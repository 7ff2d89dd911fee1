//! Notifier: an alarm raised on MQTT (published as the interlock publishes it) to the
//! message accepted by a real SMTP server (aiosmtpd) and by a webhook receiver
//! (http.server), p50/p99 over 50 alarms, one at a time.
//!
//! `cargo build --release --bins && cargo bench -p dcs-integration-tests --bench notifier`

use std::process::Command;
use std::time::{Duration, Instant};

use dcs_integration_tests::{
    bin, free_port, pct, repo_root, spawn_until, Broker, BrokerKind, Observer, Proc, PASS, USER,
};

fn peer(mode: &str, port: u16) -> Proc {
    let mut cmd = Command::new(repo_root().join(".venv/bin/python"));
    cmd.arg(repo_root().join("tests/interop/notify_peers.py"))
        .arg(mode)
        .arg(port.to_string());
    spawn_until(cmd, "ready", Duration::from_secs(15))
}

/// How many messages `p` has received.
fn received(p: &Proc) -> usize {
    p.stderr_text()
        .lines()
        .filter(|l| l.starts_with('{'))
        .count()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(BrokerKind::Dcs);
    let (smtp_port, http_port) = (free_port(), free_port());
    let smtp = peer("smtp", smtp_port);
    let hook = peer("http", http_port);
    let cfg = dir.path().join("notifier.yaml");
    std::fs::write(
        &cfg,
        format!(
            "station: bench\nstate_dir: state\n\
             timing: {{interlock_silence_secs: 3600, reminder_secs: 3600}}\n\
             channels:\n  - name: mail\n    max_per_window: 1000\n    \
             email: {{host: 127.0.0.1, port: {smtp_port}, security: none, from: dcs@lab.invalid, to: [shift@lab.invalid]}}\n  \
             - name: chat\n    max_per_window: 1000\n    \
             webhook: {{url: 'http://127.0.0.1:{http_port}/hook', format: mattermost}}\n\
             mqtt: {{url: {}, username: {USER}, password: {PASS}}}\n",
            broker.url()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("notifier"));
    cmd.arg("--config").arg(&cfg);
    let _notifier = spawn_until(cmd, "connected to MQTT broker", Duration::from_secs(15));
    let obs = Observer::connect(broker.port, "bench-notifier", &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut mail, mut web) = (Vec::new(), Vec::new());
    for i in 0..50 {
        let (m0, w0) = (received(&smtp), received(&hook));
        let payload = format!(
            r#"{{"rule":"bench_{i}","severity":"critical","state":"active","message":"bench","values":{{"x":{i}}},"actions":[]}}"#
        );
        let t = Instant::now();
        obs.publish(&format!("alarms/bench_{i}"), payload).await;
        let (mut dm, mut dw) = (None, None);
        while dm.is_none() || dw.is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "alarm {i} not delivered"
            );
            if dm.is_none() && received(&smtp) > m0 {
                dm = Some(t.elapsed().as_secs_f64());
            }
            if dw.is_none() && received(&hook) > w0 {
                dw = Some(t.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        mail.extend(dm);
        web.extend(dw);
    }
    println!("alarm published -> accepted, 50 alarms one at a time, ms (1 ms polling of the receivers' output):");
    println!(
        "SMTP (aiosmtpd): p50 {:.1}, p99 {:.1}; webhook (http.server): p50 {:.1}, p99 {:.1}",
        pct(&mut mail, 0.5) * 1e3,
        pct(&mut mail, 0.99) * 1e3,
        pct(&mut web, 0.5) * 1e3,
        pct(&mut web, 0.99) * 1e3
    );
}
