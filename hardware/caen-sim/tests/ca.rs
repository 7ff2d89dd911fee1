//! End to end over Channel Access with the `epics-ca-rs` client: an HV channel ramps up
//! and down, bad writes are refused, and the state survives a restart.
//!
//! This binary holds a single test on purpose: it sets process environment variables
//! (`EPICS_CA_*`), which is only sound while nothing else runs concurrently.

use std::path::Path;
use std::time::Duration;

use caen_sim::SimConfig;
use dcs_shared::shutdown::CancellationToken;
use epics_base_rs::types::EpicsValue;
use epics_ca_rs::client::{CaChannel, CaClient};
use tokio::task::JoinHandle;

const CONNECT: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(5);

use dcs_shared::testing::free_port;

fn start(cfg: &SimConfig) -> (CancellationToken, JoinHandle<anyhow::Result<()>>) {
    let token = CancellationToken::new();
    let task = tokio::spawn(caen_sim::run(cfg.clone(), token.clone()));
    (token, task)
}

async fn stop(token: CancellationToken, task: JoinHandle<anyhow::Result<()>>) {
    token.cancel();
    let res = tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("run() returns within 1 s of shutdown")
        .expect("run() did not panic");
    res.expect("run() ends cleanly");
}

async fn connect(client: &CaClient, name: &str) -> CaChannel {
    let ch = client.create_channel(name);
    ch.wait_connected(CONNECT)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    ch
}

async fn get_f64(ch: &CaChannel) -> f64 {
    let (_, v) = ch.get().await.expect("get");
    v.to_f64().expect("numeric")
}

/// Polls `ch` until `ok(value)` or WAIT elapses; returns the last value.
async fn wait_for(ch: &CaChannel, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = get_f64(ch).await;
        if ok(v) || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write_config(dir: &Path, port: u16) -> SimConfig {
    let path = dir.join("caen.yaml");
    std::fs::write(
        &path,
        format!(
            "name: dcs\nprefix: t\nchannels:\n  \"0\": {{lv: {{board: 0, chan: 0, setV: 13.0}}, hv: {{board: 12, chan: 0}}, module: m0}}\n\
             sim: {{port: {port}, tick_ms: 20, state_file: state.json}}\n"
        ),
    )
    .unwrap();
    let mut cfg: SimConfig = dcs_shared::config::load(&path).unwrap();
    cfg.resolve_paths(&path);
    cfg
}

#[test]
fn hv_ramps_over_channel_access_and_survives_a_restart() {
    let port = free_port();
    let repeater = free_port();
    // Sound: the only test of this binary, and no runtime or other thread of ours exists
    // yet. The server binds loopback, the client searches it only.
    caen_sim::loopback_env_defaults();
    std::env::set_var("EPICS_CA_ADDR_LIST", "127.0.0.1");
    std::env::set_var("EPICS_CA_AUTO_ADDR_LIST", "NO");
    std::env::set_var("EPICS_CA_SERVER_PORT", port.to_string());
    std::env::set_var("EPICS_CA_REPEATER_PORT", repeater.to_string());

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (token, task) = start(&cfg);
        let client = CaClient::new().await.expect("client");
        let v0set = connect(&client, "t:12:000:V0Set").await;
        let rup = connect(&client, "t:12:000:RUp").await;
        let pw = connect(&client, "t:12:000:Pw").await;
        let status = connect(&client, "t:12:000:Status").await;
        let vmon = connect(&client, "t:12:000:VMon").await;

        // Hardware defaults, not the config's setV.
        assert_eq!(get_f64(&v0set).await, 0.0);
        let lv_v0 = connect(&client, "t:00:000:V0Set").await;
        assert_eq!(get_f64(&lv_v0).await, 0.0);
        assert_eq!(
            get_f64(&connect(&client, "t:12:000:I0Set").await).await,
            500.0
        );

        v0set
            .put(&EpicsValue::Double(20.0))
            .await
            .expect("put V0Set");
        rup.put(&EpicsValue::Double(100.0)).await.expect("put RUp");
        assert_eq!(get_f64(&v0set).await, 20.0, "settings read back");
        // Refused: negative set-point, read-only PV, unknown enum label.
        assert!(v0set.put(&EpicsValue::Double(-1.0)).await.is_err());
        assert!(vmon.put(&EpicsValue::Double(5.0)).await.is_err());
        assert!(pw.put_string("Maybe").await.is_err());
        assert_eq!(get_f64(&v0set).await, 20.0);

        let mut sub = status.subscribe().await.expect("subscribe Status");
        pw.put(&EpicsValue::Enum(1)).await.expect("Pw On");
        let mut seen = Vec::new();
        let watch = async {
            while let Some(Ok(snap)) = sub.recv().await {
                let v = snap.value.to_f64().unwrap_or(-1.0);
                seen.push(v);
                if v == 1.0 && seen.contains(&3.0) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(WAIT, watch).await;
        assert!(
            seen.contains(&3.0) && seen.last() == Some(&1.0),
            "Status went {seen:?}"
        );
        assert_eq!(get_f64(&vmon).await, 20.0);
        let imon = connect(&client, "t:12:000:IMon").await;
        assert!(
            (get_f64(&imon).await - 0.2).abs() < 1e-9,
            "20 V on 100 MOhm"
        );

        // Restart (as after an IOC crash): the channel stays on.
        stop(token, task).await;
        assert!(dir.path().join("state.json").exists());
        let (token, task) = start(&cfg);
        let client = CaClient::new().await.expect("client");
        let pw = connect(&client, "t:12:000:Pw").await;
        let vmon = connect(&client, "t:12:000:VMon").await;
        let status = connect(&client, "t:12:000:Status").await;
        assert_eq!(get_f64(&pw).await, 1.0, "Pw survives the restart");
        assert_eq!(get_f64(&vmon).await, 20.0);
        assert_eq!(get_f64(&status).await, 1.0);

        // Off by label; PDwn defaults to Kill: VMon drops at once.
        pw.put_string("Off").await.expect("Pw Off");
        let v = wait_for(&vmon, |v| v == 0.0).await;
        assert_eq!(v, 0.0);
        assert_eq!(wait_for(&status, |v| v == 0.0).await, 0.0);
        stop(token, task).await;
    });
}
