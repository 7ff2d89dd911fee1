//! dcs-broker behaviour that the interop suite (tests/interop) does not cover from the
//! outside: its meters on MQTT, a clear refusal when a port is taken, and what its
//! front end adds to rumqttd: TCP_NODELAY on every connection, retained commands
//! refused, client ids bound to the accounts of the same name.

use std::process::Command;
use std::time::Duration;

use dcs_integration_tests::{
    bin, connack, free_port, pct, spawn_until, Broker, BrokerKind, Observer, Proc, PASS,
    PASSWD_LINE, USER,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

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

/// Back-to-back request/reply, as a dashboard or a sequencer talks to a service: the
/// broker writes the requester a PUBACK and then the reply. With Nagle's algorithm on
/// the broker's socket the reply waits for the requester's delayed ACK (~40 ms each
/// time); with TCP_NODELAY it goes at once (~1 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_is_not_held_back_by_nagle() {
    let broker = Broker::start(BrokerKind::Dcs);
    let mut responder = Observer::connect(broker.port, "responder", &["rr/req"]).await;
    let mut requester = Observer::connect(broker.port, "requester", &["rr/reply"]).await;
    let echo = tokio::spawn(async move {
        while let Some(g) = responder.next_on("rr/req", Duration::from_secs(20)).await {
            responder.publish("rr/reply", g.payload).await;
        }
    });
    let mut ms = Vec::new();
    for i in 0..60 {
        let n = i.to_string();
        let t = std::time::Instant::now();
        requester.publish("rr/req", n.clone()).await;
        requester
            .wait_for("rr/reply", Duration::from_secs(10), |p| p == n)
            .await
            .expect("reply");
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    echo.abort();
    let median = pct(&mut ms, 0.5);
    // Nagle gives ~40 ms every time; a loaded machine adds a few ms, never 10 at the median.
    assert!(
        median < 10.0,
        "request/reply median {median:.1} ms: is Nagle on? {ms:?}"
    );
}

/// The broker refuses a retained PUBLISH on a command topic: nothing is stored, no
/// subscriber gets the command, the refusal goes to the service's reply topic; other
/// retained messages are kept as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_commands_are_refused_not_stored_or_delivered() {
    let broker = Broker::start(BrokerKind::Dcs);
    let mut service = Observer::connect(
        broker.port,
        "svc",
        &["julabo/cmd/#", "dcs/cmd/#", "julabo/reply", "dcs/reply"],
    )
    .await;
    let mut op = Observer::connect(broker.port, "op", &[]).await;
    op.publish_acked("julabo/cmd/start", true, "").await;
    op.publish_acked("dcs/cmd/switch/lv", true, "on").await;
    op.publish_acked("julabo/status", true, r#"{"running": false}"#)
        .await;
    for (cmd, reply) in [
        ("julabo/cmd/start", "julabo/reply"),
        ("dcs/cmd/switch/lv", "dcs/reply"),
    ] {
        let r = service
            .next_on(reply, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("a refusal of {cmd} on {reply}"));
        let v: serde_json::Value = serde_json::from_str(&r.payload).unwrap();
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["topic"], cmd, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("published retained") && e.contains("nothing was stored or executed"),
            "{e}"
        );
    }
    // A live command still goes through.
    op.publish("julabo/cmd/stop", "").await;
    let live = service
        .next_on("julabo/cmd/stop", Duration::from_secs(5))
        .await;
    assert!(live.is_some_and(|g| !g.retain));
    assert_eq!(
        service
            .next_on("julabo/cmd/start", Duration::from_millis(500))
            .await,
        None
    );
    assert_eq!(
        service
            .next_on("dcs/cmd/switch/lv", Duration::from_millis(100))
            .await,
        None
    );
    // A service that subscribes later finds no command in the store, the status still.
    let mut late = Observer::connect(broker.port, "late", &["julabo/#", "dcs/#"]).await;
    let status = late.next_on("julabo/status", Duration::from_secs(5)).await;
    assert!(status.is_some_and(|g| g.retain));
    assert_eq!(
        late.next_on("julabo/cmd/start", Duration::from_millis(500))
            .await,
        None
    );
    assert_eq!(
        late.next_on("dcs/cmd/switch/lv", Duration::from_millis(100))
            .await,
        None
    );
    // A will that is a retained command would be stored when the client drops: refused
    // at connect.
    let will = LastWill::new("julabo/cmd/start", "", QoS::AtLeastOnce, true);
    let r = connack(broker.port, "willful", USER, PASS, Some(will)).await;
    assert!(r.is_err(), "a retained command as will was accepted");
}

/// A client id that is the name of an account can only be used by that account:
/// nobody with another account can connect as `interlock`, take over its session or
/// fire its last will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_is_reserved_to_the_account_of_that_name() {
    let dir = tempfile::tempdir().unwrap();
    let line = hash_line("interlock", "interlock-pw");
    std::fs::write(dir.path().join("passwd"), format!("{PASSWD_LINE}\n{line}")).unwrap();
    let port = free_port();
    let cfg = dir.path().join("broker.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listeners: {{mqtt: 127.0.0.1:{port}, mqtt5: null, websocket: null}}\n\
             auth: {{password_file: passwd}}\nmeters_interval_secs: 0\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("dcs-broker"));
    cmd.arg("--config").arg(&cfg);
    let broker: Proc = spawn_until(cmd, "listening", Duration::from_secs(15));

    let mut watch = Observer::connect(port, "watch", &["interlock/online"]).await;
    // The real interlock, with its last will.
    let mut o = MqttOptions::new("interlock", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_credentials("interlock", "interlock-pw")
        .set_last_will(LastWill::new(
            "interlock/online",
            "false",
            QoS::AtLeastOnce,
            true,
        ));
    let (real, mut el) = AsyncClient::new(o, 10);
    let (drop_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut connacks = 0;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connacks += 1;
                    if connacks > 1 {
                        let _ = drop_tx.send("reconnected");
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = drop_tx.send("connection lost");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    real.publish("interlock/online", QoS::AtLeastOnce, true, "true")
        .await
        .unwrap();
    watch
        .wait_for("interlock/online", Duration::from_secs(5), |p| p == "true")
        .await
        .expect("the real interlock online");

    for _ in 0..10 {
        let r = connack(port, "interlock", USER, PASS, None).await;
        assert!(r.is_err(), "another account connected as `interlock`");
    }
    assert_eq!(
        watch
            .next_on("interlock/online", Duration::from_secs(1))
            .await,
        None,
        "the real interlock's will fired"
    );
    assert!(
        dropped.try_recv().is_err(),
        "the real interlock was disturbed"
    );
    // The account itself and other ids of other accounts are fine.
    connack(port, "alice-tool", USER, PASS, None).await.unwrap();
    assert!(broker
        .stderr_text()
        .contains("client id `interlock` is bound to the account of that name"));
}

/// `user:hash` from `dcs-broker --hash-user`.
fn hash_line(user: &str, password: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(bin("dcs-broker"))
        .args(["--hash-user", user])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The shipped Mosquitto config and ACL (deploy/mosquitto), run by a real Mosquitto:
/// only the interlock's account publishes `interlock/permits`, operators only send
/// commands, a service writes under its own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_mosquitto_acl_keeps_each_account_to_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = dcs_integration_tests::repo_root().join("deploy/mosquitto");
    let passwd = dir.path().join("passwd");
    std::fs::write(
        &passwd,
        format!(
            "{PASSWD_LINE}\n{}{}{}",
            hash_line("interlock", "i-pw"),
            hash_line("operator", "o-pw"),
            hash_line("julabo", "j-pw")
        ),
    )
    .unwrap();
    let (port, ws) = (free_port(), free_port());
    let conf = std::fs::read_to_string(deploy.join("tracker-dcs.conf"))
        .unwrap()
        .replace("listener 1883 ", &format!("listener {port} "))
        .replace("listener 8083 ", &format!("listener {ws} "))
        .replace(
            "/etc/mosquitto/tracker-dcs.passwd",
            passwd.to_str().unwrap(),
        )
        .replace(
            "/etc/mosquitto/tracker-dcs.acl",
            deploy.join("tracker-dcs.acl").to_str().unwrap(),
        );
    assert!(conf.contains("set_tcp_nodelay true"));
    std::fs::write(dir.path().join("m.conf"), conf + "log_dest stderr\n").unwrap();
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(dir.path().join("m.conf"));
    let _m = spawn_until(cmd, "running", Duration::from_secs(15));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut watch = Observer::connect(port, "watch", &["#"]).await;
    let mut clients = [
        Observer::connect_as(port, "op", "operator", "o-pw", &[]).await,
        Observer::connect_as(port, "julabo", "julabo", "j-pw", &[]).await,
        Observer::connect_as(port, "interlock", "interlock", "i-pw", &[]).await,
    ];
    // (client, topic, allowed); each is followed by an allowed marker from the same
    // client, so "not delivered" is seen as the marker arriving first.
    let cases = [
        (0, "interlock/permits", false),
        (0, "julabo/cmd/start", true),
        (0, "julabo/status", false),
        (1, "interlock/permits", false),
        (1, "julabo/status", true),
        (2, "interlock/permits", true),
        (2, "dcs/cmd/switch/hv", true),
        // The interlock's MARTA actions.
        (2, "MARTA/cmd/stop_co2", true),
        (1, "MARTA/cmd/stop_co2", false),
    ];
    for (i, (c, topic, allowed)) in cases.into_iter().enumerate() {
        let who = ["operator", "julabo", "interlock"][c];
        let client = &mut clients[c];
        let payload = format!("case {i}");
        client.publish_acked(topic, false, &payload).await;
        let marker = if who == "operator" {
            "dcs/cmd/refresh".to_string()
        } else {
            format!("{who}/marker")
        };
        client.publish_acked(&marker, false, &payload).await;
        let got = watch
            .wait_for(&marker, Duration::from_secs(5), |p| p == payload)
            .await;
        assert!(got.is_some(), "{who}: marker on {marker} not delivered");
        let delivered = watch
            .wait_for(topic, Duration::from_millis(200), |p| p == payload)
            .await
            .is_some();
        assert_eq!(delivered, allowed, "{who} publishing on {topic}");
    }
}
