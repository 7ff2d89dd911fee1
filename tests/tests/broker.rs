//! dcs-broker behaviour that the interop suite (tests/interop) does not cover from the
//! outside: its meters on MQTT, and a clear refusal when a port is taken.

use std::process::Command;
use std::time::Duration;

use dcs_integration_tests::{bin, free_port, spawn_until, Observer, PASSWD_LINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_are_published_on_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let (p4, p5) = (free_port(), free_port());
    std::fs::write(dir.path().join("users.passwd"), format!("{PASSWD_LINE}\n")).unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        format!(
            "listeners: {{mqtt: 127.0.0.1:{p4}, mqtt5: 127.0.0.1:{p5}, websocket: null}}\n\
             auth: {{password_file: users.passwd}}\nmeters_interval_secs: 1\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("dcs-broker"));
    cmd.arg("-c").arg(dir.path().join("b.yaml"));
    let _broker = spawn_until(cmd, "mqtt5 listening", Duration::from_secs(15));
    let mut obs = Observer::connect(p4, "meters", &["dcs-broker/stats"]).await;
    // Some traffic so the router has something to count.
    for _ in 0..5 {
        obs.publish("load/x", "1").await;
    }
    let g = obs
        .wait_for("dcs-broker/stats", Duration::from_secs(10), |p| {
            serde_json::from_str::<serde_json::Value>(p)
                .is_ok_and(|v| v["connections"].as_u64() >= Some(1))
        })
        .await
        .expect("stats with our connection counted");
    let v: serde_json::Value = serde_json::from_str(&g.payload).unwrap();
    assert!(v["rss_bytes"].as_u64().unwrap() > 1_000_000, "{v}");
    assert_eq!(v["interval_secs"], 1);
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        format!("listeners: {{mqtt: 127.0.0.1:{port}, mqtt5: null, websocket: null}}\nauth: {{allow_anonymous: true}}\n"),
    )
    .unwrap();
    let out = Command::new(bin("dcs-broker"))
        .arg("-c")
        .arg(dir.path().join("b.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (mqtt listener)"
        )),
        "{err}"
    );
    assert!(err.contains("in use"), "{err}");
}

/// `dcs-broker --hash-user` writes the line a deployment puts in its password file
/// (the container images have no `mosquitto_passwd`), and a broker accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_user_makes_a_password_line_the_broker_accepts() {
    use std::io::Write as _;
    let mut child = Command::new(bin("dcs-broker"))
        .args(["--hash-user", "operator"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"an0ther-secret\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with("operator:$7$101$"), "{line}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("passwd"), &line).unwrap();
    let port = free_port();
    let cfg = dir.path().join("broker.yaml");
    std::fs::write(
        &cfg,
        format!("listeners: {{mqtt: 127.0.0.1:{port}, mqtt5: null, websocket: null}}\nauth: {{password_file: passwd}}\n"),
    )
    .unwrap();
    let mut cmd = Command::new(bin("dcs-broker"));
    cmd.arg("--config").arg(&cfg);
    let _broker = spawn_until(cmd, "listening", Duration::from_secs(15));
    let _ok = Observer::connect_as(port, "op", "operator", "an0ther-secret", &["x"]).await;
    // The same line given through the environment (`auth.password_env`, how the pod
    // passes its Secret).
    let port2 = free_port();
    let cfg2 = dir.path().join("broker-env.yaml");
    std::fs::write(
        &cfg2,
        format!("listeners: {{mqtt: 127.0.0.1:{port2}, mqtt5: null, websocket: null}}\nauth: {{password_env: TEST_PASSWD}}\n"),
    )
    .unwrap();
    let mut cmd = Command::new(bin("dcs-broker"));
    cmd.arg("--config").arg(&cfg2).env("TEST_PASSWD", &line);
    let _broker2 = spawn_until(cmd, "listening", Duration::from_secs(15));
    let _ok = Observer::connect_as(port2, "op2", "operator", "an0ther-secret", &["x"]).await;
    let out = Command::new(bin("dcs-broker"))
        .arg("--config")
        .arg(&cfg2)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TEST_PASSWD is not set"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An empty password is refused before any hashing.
    let out = Command::new(bin("dcs-broker"))
        .args(["--hash-user", "operator"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
