//! The shared MQTT session against real brokers: reconnect, re-subscribe, republish of
//! retained state, birth and will, MQTT 5 replies. The same code runs against our
//! broker and against Debian's Mosquitto as an external broker.

use std::time::Duration;

use dcs_integration_tests::{Broker, BrokerKind, Observer, PASS, USER};
use dcs_shared::mqtt::MqttVersion;
use dcs_shared::{MqttSettings, QoS, Reply, Session, SessionEvent, SessionOptions};
use tokio::sync::mpsc::Receiver;

const WAIT: Duration = Duration::from_secs(15);

fn settings(url: String, version: MqttVersion) -> MqttSettings {
    MqttSettings {
        url,
        username: Some(USER.into()),
        password: Some(PASS.into()),
        keep_alive_secs: 5,
        version,
        ..Default::default()
    }
}

async fn next_event(
    events: &mut Receiver<SessionEvent>,
    want: fn(&SessionEvent) -> bool,
) -> SessionEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let ev = events.recv().await.expect("session ended");
            if want(&ev) {
                return ev;
            }
        }
    })
    .await
    .expect("expected session event did not come")
}

async fn recovers_after_broker_restart(kind: BrokerKind) {
    let mut broker = Broker::start(kind);
    let options = SessionOptions::new("svc").subscribe("svc/cmd/#", QoS::AtLeastOnce);
    let (session, mut events) =
        Session::start(&settings(broker.url(), MqttVersion::V311), options).unwrap();
    next_event(&mut events, |e| *e == SessionEvent::Connected).await;
    session.publish_state("svc/status", "LV_ON");

    let mut obs = Observer::connect(broker.port, "obs1", &["svc/#"]).await;
    let online = obs
        .next_on("svc/online", WAIT)
        .await
        .expect("birth message");
    assert_eq!(online.payload, "true");
    obs.wait_for("svc/status", WAIT, |p| p == "LV_ON")
        .await
        .expect("state");
    drop(obs);
    // Retained: a subscriber arriving after the publish gets it from the broker.
    let mut late = Observer::connect(broker.port, "obs1b", &["svc/status"]).await;
    let status = late
        .next_on("svc/status", WAIT)
        .await
        .expect("retained state");
    assert_eq!((status.payload.as_str(), status.retain), ("LV_ON", true));
    drop(late);

    // The broker dies and comes back empty (no persistence): nothing retained survives.
    broker.kill();
    let ev = next_event(&mut events, |e| matches!(e, SessionEvent::Disconnected(_))).await;
    assert!(matches!(ev, SessionEvent::Disconnected(ref why) if !why.is_empty()));
    // State changes while the broker is away are kept and sent on reconnect.
    session.publish_state("svc/status", "LV_OFF");
    broker.restart();
    next_event(&mut events, |e| *e == SessionEvent::Connected).await;

    // The session restores the birth and the latest state...
    let mut obs = Observer::connect(broker.port, "obs2", &["svc/#"]).await;
    obs.wait_for("svc/status", WAIT, |p| p == "LV_OFF")
        .await
        .expect("state republished");
    obs.wait_for("svc/online", WAIT, |p| p == "true")
        .await
        .expect("birth republished");
    // ...as retained messages: a subscriber arriving later gets them from the broker.
    let mut late = Observer::connect(broker.port, "obs2b", &["svc/#"]).await;
    let g = late
        .next_on("svc/status", WAIT)
        .await
        .expect("retained state");
    assert_eq!((g.payload.as_str(), g.retain), ("LV_OFF", true));
    let g = late
        .next_on("svc/online", WAIT)
        .await
        .expect("retained birth");
    assert_eq!((g.payload.as_str(), g.retain), ("true", true));
    drop(late);

    // And the session re-subscribed: a command reaches it.
    obs.publish("svc/cmd/refresh", "").await;
    let SessionEvent::Message(m) =
        next_event(&mut events, |e| matches!(e, SessionEvent::Message(_))).await
    else {
        unreachable!()
    };
    assert_eq!(m.topic, "svc/cmd/refresh");

    // A clean shutdown leaves `online = false` retained.
    session.shutdown().await;
    let g = obs
        .wait_for("svc/online", WAIT, |p| p == "false")
        .await
        .expect("offline on shutdown");
    assert!(!g.payload.is_empty());
    drop(obs);
    let mut late = Observer::connect(broker.port, "obs3", &["svc/online"]).await;
    let g = late
        .next_on("svc/online", WAIT)
        .await
        .expect("retained offline");
    assert_eq!((g.payload.as_str(), g.retain), ("false", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_recovers_after_dcs_broker_restart() {
    recovers_after_broker_restart(BrokerKind::Dcs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_recovers_after_mosquitto_restart() {
    recovers_after_broker_restart(BrokerKind::Mosquitto).await;
}

/// The last will fires when a service dies without saying goodbye: the session's
/// runtime is dropped, which closes the socket without DISCONNECT, as a crash would.
#[test]
fn last_will_on_abrupt_disconnect() {
    let broker = Broker::start(BrokerKind::Dcs);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let observer_rt = tokio::runtime::Runtime::new().unwrap();
    let mut obs = observer_rt.block_on(Observer::connect(broker.port, "obs", &["dying/online"]));
    rt.block_on(async {
        let (_session, mut events) = Session::start(
            &settings(broker.url(), MqttVersion::V311),
            SessionOptions::new("dying"),
        )
        .unwrap();
        next_event(&mut events, |e| *e == SessionEvent::Connected).await;
    });
    observer_rt.block_on(async {
        let g = obs.wait_for("dying/online", WAIT, |p| p == "true").await;
        assert!(g.is_some(), "birth");
    });
    rt.shutdown_background(); // the socket closes, no DISCONNECT sent
    observer_rt.block_on(async {
        let g = obs.wait_for("dying/online", WAIT, |p| p == "false").await;
        assert!(g.is_some(), "last will `false` not delivered");
    });
}

async fn v5_reply(kind: BrokerKind) {
    let broker = Broker::start(kind);
    let url5 = format!("mqtt://127.0.0.1:{}", broker.port5);
    let options = SessionOptions::new("svc5").subscribe("svc5/cmd/#", QoS::AtLeastOnce);
    let (session, mut events) =
        Session::start(&settings(url5.clone(), MqttVersion::V5), options).unwrap();
    next_event(&mut events, |e| *e == SessionEvent::Connected).await;

    // An MQTT 5 requester with response topic and correlation data.
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let mut o = rumqttc::v5::MqttOptions::new("requester", "127.0.0.1", broker.port5);
    o.set_keep_alive(Duration::from_secs(5))
        .set_credentials(USER, PASS);
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    client
        .subscribe("answers/#", Q5::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe("svc5/reply", Q5::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            match ev {
                rumqttc::v5::Event::Incoming(Packet::SubAck(_)) => {
                    let _ = tx.send(None);
                }
                rumqttc::v5::Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(Some(p));
                }
                _ => {}
            }
        }
    });
    for _ in 0..2 {
        assert_eq!(
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap(),
            None
        );
    }
    let props = PublishProperties {
        response_topic: Some("answers/42".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00req-42")),
        ..Default::default()
    };
    client
        .publish_with_properties("svc5/cmd/refresh", Q5::AtLeastOnce, false, "", props)
        .await
        .unwrap();

    let SessionEvent::Message(cmd) =
        next_event(&mut events, |e| matches!(e, SessionEvent::Message(_))).await
    else {
        unreachable!()
    };
    assert_eq!(cmd.response_topic.as_deref(), Some("answers/42"));
    session
        .reply(&cmd, &Reply::ok(&cmd.topic, "IDLE"))
        .await
        .unwrap();

    let mut on_reply_topic = None;
    let mut on_response_topic = None;
    while on_reply_topic.is_none() || on_response_topic.is_none() {
        let p = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("replies")
            .unwrap()
            .unwrap();
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        let body: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"topic": "svc5/cmd/refresh", "ok": true, "state": "IDLE"})
        );
        match topic.as_str() {
            "svc5/reply" => on_reply_topic = Some(()),
            "answers/42" => {
                let corr = p.properties.and_then(|pr| pr.correlation_data);
                assert_eq!(
                    corr.as_deref(),
                    Some(&b"\x00req-42"[..]),
                    "correlation data echoed"
                );
                on_response_topic = Some(());
            }
            other => panic!("unexpected topic {other}"),
        }
    }
    session.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_reply_honours_response_topic_on_dcs_broker() {
    v5_reply(BrokerKind::Dcs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_reply_honours_response_topic_on_mosquitto() {
    v5_reply(BrokerKind::Mosquitto).await;
}

#[tokio::test]
async fn wrong_password_is_reported_and_retried() {
    let broker = Broker::start(BrokerKind::Mosquitto);
    let mut s = settings(broker.url(), MqttVersion::V311);
    s.password = Some("wrong".into());
    let (session, mut events) = Session::start(&s, SessionOptions::new("bad")).unwrap();
    let ev = next_event(&mut events, |e| matches!(e, SessionEvent::Disconnected(_))).await;
    let SessionEvent::Disconnected(why) = ev else {
        unreachable!()
    };
    assert!(why.contains("username and password"), "{why}");
    assert!(!session.is_connected());
}

#[test]
fn unusable_settings_are_refused_up_front() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let s = MqttSettings {
        keep_alive_secs: 0,
        ..Default::default()
    };
    let err = Session::start(&s, SessionOptions::new("x"))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("keep_alive_secs"), "{err}");
    let s = MqttSettings {
        url: "mqtt://nohost".into(),
        ..Default::default()
    };
    let err = Session::start(&s, SessionOptions::new("x"))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("no port"), "{err}");
}

/// A command left retained on the broker reaches a (re)starting service flagged as
/// retained, and the envelope refuses it rather than running it again. (Mosquitto:
/// dcs-broker does not store retained commands at all, see tests/tests/broker.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_command_is_refused_not_replayed() {
    use dcs_shared::command::{self, Command, CommandError};
    #[derive(Debug)]
    struct Start;
    impl Command for Start {
        fn parse(path: &[&str], _: &[u8]) -> Result<Self, CommandError> {
            match path {
                ["start"] => Ok(Start),
                _ => Err(CommandError::new("unknown")),
            }
        }
    }
    let broker = Broker::start(BrokerKind::Mosquitto);
    let mut obs = Observer::connect(broker.port, "stale-publisher", &[]).await;
    // Acknowledged, hence stored on the broker, before anyone subscribes: a
    // subscriber arriving first would get a live (not retained) copy.
    obs.publish_acked("svc9/cmd/start", true, "on").await;
    let mut check = Observer::connect(broker.port, "check", &["svc9/cmd/start"]).await;
    assert!(check
        .next_on("svc9/cmd/start", WAIT)
        .await
        .is_some_and(|g| g.retain));
    let options = SessionOptions::new("svc9").subscribe("svc9/cmd/#", QoS::AtLeastOnce);
    let (_session, mut events) =
        Session::start(&settings(broker.url(), MqttVersion::V311), options).unwrap();
    let SessionEvent::Message(m) =
        next_event(&mut events, |e| matches!(e, SessionEvent::Message(_))).await
    else {
        unreachable!()
    };
    assert!(m.retain);
    let err = command::parse::<Start>("svc9", &m).unwrap().unwrap_err();
    assert!(err.0.contains("published retained"), "{err}");
}
