//! The CAEN simulator and FSM on private Channel Access ports, and a CA client for the
//! test itself (to watch what reaches the "hardware" and to inject faults).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use epics_base_rs::types::EpicsValue;
use epics_ca_rs::client::{CaChannel, CaClient};

use crate::{bin, free_port, spawn_until, Proc};

const WAIT: Duration = Duration::from_secs(30);

/// Channel Access ports private to one test: search/TCP, beacons, repeater.
#[derive(Debug, Clone, Copy)]
pub struct CaPorts {
    /// `EPICS_CA_SERVER_PORT` (UDP search and TCP).
    pub server: u16,
    /// `EPICS_CAS_BEACON_PORT` / `EPICS_CA_REPEATER_PORT`.
    pub beacon: u16,
}

impl CaPorts {
    /// Free ports.
    pub fn free() -> CaPorts {
        CaPorts {
            server: free_port(),
            beacon: free_port(),
        }
    }

    /// The standard EPICS environment for a client or server on these ports, loopback
    /// only.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("EPICS_CA_ADDR_LIST", "127.0.0.1".into()),
            ("EPICS_CA_AUTO_ADDR_LIST", "NO".into()),
            ("EPICS_CA_SERVER_PORT", self.server.to_string()),
            ("EPICS_CA_REPEATER_PORT", self.beacon.to_string()),
            ("EPICS_CAS_INTF_ADDR_LIST", "127.0.0.1".into()),
            ("EPICS_CAS_AUTO_BEACON_ADDR_LIST", "NO".into()),
            ("EPICS_CAS_BEACON_ADDR_LIST", "127.0.0.1".into()),
            ("EPICS_CAS_BEACON_PORT", self.beacon.to_string()),
        ]
    }

    /// Applies [`CaPorts::env`] to a command.
    pub fn apply(&self, cmd: &mut Command) {
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }
}

/// A channel of a test config: (id, module, lv board, lv chan, hv board, hv chan).
pub type TestChannel<'a> = (&'a str, Option<&'a str>, u8, u16, u8, u16);

/// A config for both the simulator and the FSM, with fast ramps so tests stay short.
pub fn config(
    name: &str,
    mqtt_port: u16,
    ports: CaPorts,
    state_file: &Path,
    channels: &[TestChannel],
) -> String {
    let mut y = format!(
        "name: {name}\nprefix: test\nmqtt:\n  url: mqtt://127.0.0.1:{mqtt_port}\n  username: {}\n  password: {}\n  keep_alive_secs: 5\n\
         ca:\n  addr_list: 127.0.0.1:{}\n  put_timeout_secs: 2\n  connect_timeout_secs: 3\n\
         safety:\n  hv_safe_voltage: 5.0\n  hv_off_timeout_secs: 20\n\
         timing:\n  refresh_secs: 30\n\
         sim:\n  port: {}\n  tick_ms: 20\n  state_file: {}\n\
         global:\n  lv: {{setV: 12.0, maxI: 5.0, tripTime: 1.0, rampUpTime: 0.0, rampDwnTime: 0.0, tripExt: \"0b00010001\", limitV: 15}}\n  \
         hv: {{setV: 60.0, maxI: 500.0, rampUpSpeed: 100.0, rampDwnSpeed: 50.0, tripTime: 0.5, tripMode: Ramp, imRange: Low, limitV: 300}}\n\
         channels:\n",
        crate::USER,
        crate::PASS,
        ports.server,
        ports.server,
        state_file.display()
    );
    for (id, module, lb, lc, hb, hc) in channels {
        y.push_str(&format!(
            "  \"{id}\": {{lv: {{board: {lb}, chan: {lc}}}, hv: {{board: {hb}, chan: {hc}}}{}}}\n",
            module.map(|m| format!(", module: {m}")).unwrap_or_default()
        ));
    }
    y
}

/// A `caen-sim` process, restartable on the same ports with the same state file.
pub struct CaenSim {
    /// Its config file.
    pub config: PathBuf,
    /// Its ports.
    pub ports: CaPorts,
    proc: Option<Proc>,
}

impl CaenSim {
    /// Starts the simulator on `config` and waits until it serves.
    pub fn start(config: &Path, ports: CaPorts) -> CaenSim {
        let mut s = CaenSim {
            config: config.to_path_buf(),
            ports,
            proc: None,
        };
        s.restart();
        s
    }

    /// (Re)starts it.
    pub fn restart(&mut self) {
        let mut cmd = Command::new(bin("caen-sim"));
        cmd.arg("--config").arg(&self.config);
        // Its PV writes (debug: quiet in a healthy stack) are what tests read back.
        cmd.env("DCS_LOG", "info,caen_sim::server=debug");
        self.ports.apply(&mut cmd);
        self.proc = Some(spawn_until(cmd, "caen-sim: serving", WAIT));
    }

    /// SIGKILL: the IOC crashes.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// The process, while it runs.
    pub fn proc(&mut self) -> Option<&mut Proc> {
        self.proc.as_mut()
    }
}

/// A `caen-fsm` process.
pub fn start_fsm(config: &Path, ports: CaPorts) -> Proc {
    start_fsm_with(config, ports, &[])
}

/// A `caen-fsm` process with extra environment (e.g. `EPICS_CA_CONN_TMO`).
pub fn start_fsm_with(config: &Path, ports: CaPorts, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(bin("caen-fsm"));
    cmd.arg("--config").arg(config);
    ports.apply(&mut cmd);
    cmd.envs(env.iter().copied());
    spawn_until(cmd, "watching PVs", WAIT)
}

/// The test's own CA client, searching only this test's server.
pub struct Ca {
    client: CaClient,
}

impl Ca {
    /// A client for the server on `ports`.
    pub async fn new(ports: CaPorts) -> Ca {
        let client = CaClient::new().await.expect("CA client");
        client.set_address_list(vec![std::net::SocketAddr::from((
            [127, 0, 0, 1],
            ports.server,
        ))]);
        Ca { client }
    }

    /// A connected channel.
    pub async fn channel(&self, pv: &str) -> CaChannel {
        let ch = self.client.create_channel(pv);
        ch.wait_connected(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{pv}: {e}"));
        ch
    }

    /// Reads a PV as a number.
    pub async fn get(&self, pv: &str) -> f64 {
        let (_, v) = self.channel(pv).await.get().await.expect("get");
        v.to_f64().unwrap_or(f64::NAN)
    }

    /// Writes a number.
    pub async fn put(&self, pv: &str, value: f64) {
        self.channel(pv)
            .await
            .put(&EpicsValue::Double(value))
            .await
            .unwrap_or_else(|e| panic!("put {pv}: {e}"));
    }
}
