//! Request/reply round trips through a broker, as a dashboard, the interlock or a
//! sequencer talks to a service: publish a command (QoS 1), wait for the reply, send the
//! next. `dcs-broker` and Debian's Mosquitto, with and without `set_tcp_nodelay`, in the
//! same run; both clients set TCP_NODELAY on their own sockets, as paho does.
//!
//! `cargo build --release -p dcs-broker && cargo bench -p dcs-integration-tests --bench request_reply`
//! Prints p50/p99 and how many round trips took over 20 ms (Nagle's algorithm on the
//! broker's side holds a reply ~40 ms for the client's delayed ACK), and the ratios to
//! Mosquitto with `set_tcp_nodelay true`. `BENCH_ROUNDS` sets the round trips per
//! broker (default 300).

use std::time::{Duration, Instant};

use dcs_integration_tests::{pct, Broker, BrokerKind, PASS, USER};
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::sync::mpsc;

struct Figures {
    p50_ms: f64,
    p99_ms: f64,
    over_20ms: usize,
    rounds: usize,
}

/// A connected client and the payloads of what it receives.
async fn client(
    port: u16,
    id: &str,
    filter: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_credentials(USER, PASS);
    let (c, mut el) = AsyncClient::new(o, 100);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
    c.subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p.payload.to_vec()).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(_) => {}
                // The broker stopping at the end of a run.
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready.recv())
        .await
        .expect("SUBACK");
    (c, rx)
}

async fn run(broker: &Broker, rounds: usize) -> Figures {
    let (responder, mut requests) = client(broker.port, "rr-responder", "rr/req").await;
    let (requester, mut replies) = client(broker.port, "rr-requester", "rr/reply").await;
    let echo = tokio::spawn(async move {
        while let Some(p) = requests.recv().await {
            if responder
                .publish("rr/reply", QoS::AtLeastOnce, false, p)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut ms = Vec::with_capacity(rounds);
    for i in 0..rounds + 10 {
        let n = (i as u64).to_be_bytes().to_vec();
        let t = Instant::now();
        requester
            .publish("rr/req", QoS::AtLeastOnce, false, n.clone())
            .await
            .expect("publish");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), replies.recv()).await {
                Ok(Some(p)) if p == n => break,
                Ok(Some(_)) => continue,
                _ => panic!("no reply within 10 s"),
            }
        }
        // The first rounds warm up connections and routes.
        if i >= 10 {
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    echo.abort();
    let over_20ms = ms.iter().filter(|&&m| m > 20.0).count();
    Figures {
        p50_ms: pct(&mut ms, 0.5),
        p99_ms: pct(&mut ms, 0.99),
        over_20ms,
        rounds,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    println!("request/reply round trips (QoS 1, back to back), {rounds} per broker");
    println!(
        "{:<38} {:>9} {:>9} {:>10}",
        "broker", "p50 ms", "p99 ms", "> 20 ms"
    );
    let mut rows = Vec::new();
    for (label, broker) in [
        ("dcs-broker", Broker::start(BrokerKind::Dcs)),
        ("Mosquitto (defaults)", Broker::start_mosquitto("")),
        (
            "Mosquitto (set_tcp_nodelay true)",
            Broker::start_mosquitto("set_tcp_nodelay true\n"),
        ),
    ] {
        let f = run(&broker, rounds).await;
        println!(
            "{label:<38} {:>9.2} {:>9.2} {:>6} of {}",
            f.p50_ms, f.p99_ms, f.over_20ms, f.rounds
        );
        rows.push(f);
    }
    let (dcs, nodelay) = (&rows[0], &rows[2]);
    println!(
        "dcs-broker / Mosquitto (set_tcp_nodelay true): p50 {:.2}x, p99 {:.2}x",
        dcs.p50_ms / nodelay.p50_ms,
        dcs.p99_ms / nodelay.p99_ms
    );
}
