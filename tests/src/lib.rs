//! Test harness: real brokers and the suite's own binaries on free loopback ports.
//!
//! Every test starts its own processes on ports it picked, so tests run in parallel.
//! Binaries are taken from the cargo target directory (`cargo build --workspace` first;
//! `.ci/run` does), or from `DCS_BIN_DIR`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

pub mod caen;
pub mod db;
pub mod forwarder;

/// Username and password every test broker accepts.
pub const USER: &str = "alice";
/// Password of [`USER`].
pub const PASS: &str = "s3cret";
/// `mosquitto_passwd -b -c FILE alice s3cret`.
pub const PASSWD_LINE: &str = "alice:$7$101$A4ZHLsuMM+NzxPM2$AGuo0ReuABnaPoO9y9K7z8PCWur+winy5U32oLSDitRpKGw0TUf3cVpYENhZhcFK/fac4+kMhCTjJ3qYmHOwRA==";

pub use dcs_shared::testing::free_port;

/// Path of one of the workspace's binaries.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("DCS_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/<profile>/deps/<test-exe> -> target/<profile>
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_path_buf()
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// CPU time (user + system) a process has used, seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    // utime + stime, fields 14 and 15, in clock ticks (100 Hz).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The `p` quantile (0..1) of `v` (sorted in place).
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Peak resident memory (VmHWM) of a process, MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Everything it wrote to stderr so far is collected here by a thread.
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Proc {
    /// Sends SIGTERM and waits up to `within` for the exit; returns the status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it printed on stderr.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cmd` and waits until its stdout or stderr shows `ready` (a substring), or
/// panics with what it printed.
pub fn spawn_until(mut cmd: Command, ready: &str, within: Duration) -> Proc {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    fn pump(
        r: impl Read + Send + 'static,
        tx: std::sync::mpsc::Sender<String>,
        keep: Option<std::sync::Arc<std::sync::Mutex<String>>>,
    ) {
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                if let Some(k) = &keep {
                    if let Ok(mut k) = k.lock() {
                        k.push_str(&line);
                        k.push('\n');
                    }
                }
                let _ = tx.send(line);
            }
        });
    }
    pump(child.stdout.take().expect("stdout"), tx.clone(), None);
    pump(
        child.stderr.take().expect("stderr"),
        tx,
        Some(stderr.clone()),
    );
    let deadline = Instant::now() + within;
    let mut seen = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(line) => {
                let hit = line.contains(ready);
                seen.push_str(&line);
                seen.push('\n');
                if hit {
                    // Keep draining so the child never blocks on a full pipe.
                    std::thread::spawn(move || while rx.recv().is_ok() {});
                    return Proc { child, stderr };
                }
            }
            Err(_) if Instant::now() >= deadline => {
                let _ = child.kill();
                panic!("{cmd:?} not ready within {within:?}; output:\n{seen}");
            }
            Err(_) => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{cmd:?} exited early ({status}); output:\n{seen}");
                }
            }
        }
    }
}

/// Which broker a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// Our `dcs-broker` (rumqttd).
    Dcs,
    /// Debian's Mosquitto, as the external broker a lab may use instead.
    Mosquitto,
}

/// A broker process on free ports, restartable on the same ports.
pub struct Broker {
    /// Which implementation.
    pub kind: BrokerKind,
    /// MQTT 3.1.1 port (Mosquitto: the one listener, all versions).
    pub port: u16,
    /// MQTT 5 port (Mosquitto: same as `port`).
    pub port5: u16,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Broker {
    /// Starts a broker that requires [`USER`]/[`PASS`].
    pub fn start(kind: BrokerKind) -> Broker {
        Self::start_with(kind, "")
    }

    /// Like [`Broker::start`]; `dcs_limits` is the YAML body of `limits:` for dcs-broker
    /// (`"{segment_size: 104857600}"`), ignored for Mosquitto.
    pub fn start_with(kind: BrokerKind, dcs_limits: &str) -> Broker {
        Self::start_inner(kind, dcs_limits, "")
    }

    /// Mosquitto with extra lines in its config (`"set_tcp_nodelay true\n"`).
    pub fn start_mosquitto(extra_conf: &str) -> Broker {
        Self::start_inner(BrokerKind::Mosquitto, "", extra_conf)
    }

    fn start_inner(kind: BrokerKind, dcs_limits: &str, mosquitto_extra: &str) -> Broker {
        let limits = if dcs_limits.is_empty() {
            String::new()
        } else {
            format!("limits: {dcs_limits}\n")
        };
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("users.passwd"), format!("{PASSWD_LINE}\n"))
            .expect("passwd");
        let port = free_port();
        let port5 = if kind == BrokerKind::Dcs {
            free_port()
        } else {
            port
        };
        match kind {
            BrokerKind::Dcs => std::fs::write(
                dir.path().join("broker.yaml"),
                format!(
                    "listeners: {{mqtt: 127.0.0.1:{port}, mqtt5: 127.0.0.1:{port5}, websocket: null}}\n\
                     auth: {{password_file: users.passwd}}\nmeters_interval_secs: 0\n{limits}"
                ),
            ),
            BrokerKind::Mosquitto => std::fs::write(
                dir.path().join("mosquitto.conf"),
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\nlog_dest stderr\n\
                     # Queue for persistent sessions while their client is away (default 1000).\n\
                     max_queued_messages 1000000\n{mosquitto_extra}",
                    dir.path().join("users.passwd").display()
                ),
            ),
        }
        .expect("config");
        let mut b = Broker {
            kind,
            port,
            port5,
            dir,
            proc: None,
        };
        b.restart();
        b
    }

    /// (Re)starts the process on the same ports.
    pub fn restart(&mut self) {
        let within = Duration::from_secs(15);
        self.proc = Some(match self.kind {
            BrokerKind::Dcs => {
                let mut cmd = Command::new(bin("dcs-broker"));
                cmd.arg("--config").arg(self.dir.path().join("broker.yaml"));
                spawn_until(cmd, "mqtt5 listening", within)
            }
            BrokerKind::Mosquitto => {
                let mut cmd = Command::new("mosquitto");
                cmd.arg("-c").arg(self.dir.path().join("mosquitto.conf"));
                spawn_until(cmd, "running", within)
            }
        });
        if self.kind == BrokerKind::Dcs {
            return;
        }
        // Mosquitto prints "running" just before it listens.
        let deadline = Instant::now() + within;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of the running broker.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    /// Kills the process abruptly (SIGKILL): everything it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// A received message as a test sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Got {
    /// Topic.
    pub topic: String,
    /// Payload as text (lossy).
    pub payload: String,
    /// Retain flag as delivered.
    pub retain: bool,
}

/// An independent MQTT 3.1.1 client (rumqttc) that records what it receives.
pub struct Observer {
    /// For publishing.
    pub client: rumqttc::AsyncClient,
    rx: mpsc::UnboundedReceiver<Got>,
    /// One unit per PUBACK received.
    acks: mpsc::UnboundedReceiver<()>,
    /// Received but not yet asked for, in arrival order.
    pending: std::collections::VecDeque<Got>,
}

impl Observer {
    /// Connects as [`USER`] to `port` and subscribes to `filters` (QoS 1).
    pub async fn connect(port: u16, id: &str, filters: &[&str]) -> Observer {
        Self::connect_as(port, id, USER, PASS, filters).await
    }

    /// Connects with the given credentials and subscribes to `filters` (QoS 1).
    pub async fn connect_as(
        port: u16,
        id: &str,
        user: &str,
        pass: &str,
        filters: &[&str],
    ) -> Observer {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5))
            .set_credentials(user, pass);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        el.set_network_options(net);
        for f in filters {
            client
                .subscribe(*f, rumqttc::QoS::AtLeastOnce)
                .await
                .expect("subscribe");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let _ = tx.send(Got {
                            topic: p.topic.clone(),
                            payload: String::from_utf8_lossy(&p.payload).into_owned(),
                            retain: p.retain,
                        });
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        for _ in filters {
            tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
                .await
                .expect("observer SUBACK");
        }
        Observer {
            client,
            rx,
            acks,
            pending: Default::default(),
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK, so the message is
    /// stored (and, if retained, kept) before the caller goes on.
    pub async fn publish_acked(&mut self, topic: &str, retain: bool, payload: &str) {
        while self.acks.try_recv().is_ok() {}
        self.client
            .publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                retain,
                payload.as_bytes().to_vec(),
            )
            .await
            .expect("publish");
        tokio::time::timeout(Duration::from_secs(10), self.acks.recv())
            .await
            .expect("PUBACK within 10 s");
    }

    /// The next message on `topic` within `within`; messages on other topics stay
    /// queued for later calls.
    pub async fn next_on(&mut self, topic: &str, within: Duration) -> Option<Got> {
        if let Some(i) = self.pending.iter().position(|g| g.topic == topic) {
            return self.pending.remove(i);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(g)) if g.topic == topic => return Some(g),
                Ok(Some(g)) => self.pending.push_back(g),
                _ => return None,
            }
        }
    }

    /// Waits for a message on `topic` whose payload satisfies `pred`.
    pub async fn wait_for(
        &mut self,
        topic: &str,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<Got> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_on(topic, left).await {
                Some(g) if pred(&g.payload) => return Some(g),
                Some(_) => continue,
                None => return None,
            }
        }
    }

    /// The next JSON message on `topic` satisfying `pred` within `within` (earlier
    /// messages still queued count: [`Observer::discard`] first to wait for a new one);
    /// panics naming `what` when none comes.
    pub async fn wait_json(
        &mut self,
        topic: &str,
        within: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let g = self
            .wait_for(topic, within, |p| {
                serde_json::from_str(p).is_ok_and(|v: serde_json::Value| pred(&v))
            })
            .await
            .unwrap_or_else(|| panic!("no {topic} with {what} within {within:?}"));
        serde_json::from_str(&g.payload).unwrap_or(serde_json::Value::Null)
    }

    /// Forgets what arrived on `topic` so far, so that the next wait sees only what
    /// comes after a command (a status or reply topic repeats the same content).
    pub fn discard(&mut self, topic: &str) {
        while let Ok(g) = self.rx.try_recv() {
            self.pending.push_back(g);
        }
        self.pending.retain(|g| g.topic != topic);
    }

    /// Sends `<service>/cmd/<verb>` and returns its reply from `<service>/reply`
    /// (SPEC 3.4: matched by the command topic); panics when none comes in `within`.
    pub async fn command(
        &mut self,
        service: &str,
        verb: &str,
        payload: &str,
        within: Duration,
    ) -> serde_json::Value {
        let topic = format!("{service}/cmd/{verb}");
        self.publish(&topic, payload.to_string()).await;
        self.wait_json(&format!("{service}/reply"), within, &topic, |r| {
            r["topic"] == topic.as_str()
        })
        .await
    }

    /// Publishes at QoS 1.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) {
        self.client
            .publish_bytes(topic, rumqttc::QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }
}

/// Connects once with `id`, `user`, `pass` (and a last will) and returns whether the
/// broker accepted the CONNECT, or what happened instead.
pub async fn connack(
    port: u16,
    id: &str,
    user: &str,
    pass: &str,
    will: Option<rumqttc::LastWill>,
) -> Result<(), String> {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_credentials(user, pass);
    if let Some(w) = will {
        o.set_last_will(w);
    }
    let (_client, mut el) = rumqttc::AsyncClient::new(o, 10);
    match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c))))
            if c.code == rumqttc::ConnectReturnCode::Success =>
        {
            Ok(())
        }
        other => Err(format!("{other:?}")),
    }
}

/// julabo-sim on a free TCP port with its fault-injection control port, dropping
/// commands closer than `spacing_ms`; returns the process and (tcp, control) ports.
pub fn start_julabo_sim(spacing_ms: u32) -> (Proc, u16, u16) {
    let (tcp, control) = (free_port(), free_port());
    let mut cmd = Command::new(bin("julabo-sim"));
    cmd.args([
        "--tcp",
        &format!("127.0.0.1:{tcp}"),
        "--control",
        &format!("127.0.0.1:{control}"),
        "--min-spacing-ms",
        &spacing_ms.to_string(),
    ]);
    let sim = spawn_until(cmd, "julabo-sim: control on", Duration::from_secs(30));
    (sim, tcp, control)
}
