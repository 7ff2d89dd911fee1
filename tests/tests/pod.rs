//! The container images and the simulated pod with real podman (SPEC 8): images built
//! by deploy/build-images.sh, `podman kube play` of deploy/pod/tracker-dcs-sim.yaml,
//! MQTT from the host over 127.0.0.1, a command and its effect, a clean stop, and a
//! volume backed up and restored. `.ci/run` installs podman and builds the images
//! first; without podman this test fails and says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use dcs_integration_tests::{free_port, repo_root, Observer};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn podman(args: &[&str]) -> Output {
    let out = Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", containers_conf())
        .output()
        .unwrap_or_else(|e| panic!("podman not runnable ({e}): install it (bash .ci/run does)"));
    out
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn containers_conf() -> PathBuf {
    std::env::var_os("CONTAINERS_CONF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/podman/containers.conf"))
}

fn script(path: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(repo_root().join(path))
        .args(args)
        .envs(env.iter().copied())
        .env("CONTAINERS_CONF", containers_conf())
        .output()
        .unwrap();
    ok(out, path)
}

/// Removes what the test created, whatever happened.
struct Cleanup {
    pod_file: PathBuf,
    volume: String,
    secret: String,
    config: String,
    sequences: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let f = self.pod_file.to_string_lossy().into_owned();
        podman(&["kube", "down", &f]);
        podman(&["volume", "rm", "-f", &self.volume]);
        // kube play keeps a ConfigMap as a volume of its name.
        podman(&["volume", "rm", "-f", &self.config]);
        podman(&["volume", "rm", "-f", &self.sequences]);
        podman(&["secret", "rm", &self.secret]);
    }
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_pod_plays_answers_over_mqtt_stops_cleanly_and_its_volume_restores() {
    let root = repo_root();
    let dir = tempfile::tempdir().unwrap();
    // Images: a no-op rebuild when .ci/run has built them.
    let built = script("deploy/build-images.sh", &[], &[]);
    println!("{built}");

    // This test's own names and ports, so it never touches a user's pod.
    let port = free_port();
    let tag = format!("t{port}");
    let (pod, volume, secret, config, sequences) = (
        format!("tracker-dcs-sim-{tag}"),
        format!("tracker-dcs-sim-state-{tag}"),
        format!("tracker-dcs-mqtt-{tag}"),
        format!("tracker-dcs-config-{tag}"),
        format!("tracker-dcs-burnin-{tag}"),
    );
    let yaml = std::fs::read_to_string(root.join("deploy/pod/tracker-dcs-sim.yaml"))
        .unwrap()
        .replace("name: tracker-dcs-sim\n", &format!("name: {pod}\n"))
        .replace("tracker-dcs-sim-state", &volume)
        .replace("name: tracker-dcs-mqtt,", &format!("name: {secret},"))
        .replace("{name: tracker-dcs-config}", &format!("{{name: {config}}}"))
        .replace(
            "{name: tracker-dcs-burnin}",
            &format!("{{name: {sequences}}}"),
        )
        .replace("hostPort: 1883,", &format!("hostPort: {port},"))
        .replace("hostPort: 1884,", &format!("hostPort: {},", free_port()))
        .replace("hostPort: 8083,", &format!("hostPort: {},", free_port()));
    let pod_file = dir.path().join("pod.yaml");
    std::fs::write(&pod_file, &yaml).unwrap();
    let _cleanup = Cleanup {
        pod_file: pod_file.clone(),
        volume: volume.clone(),
        secret: secret.clone(),
        config: config.clone(),
        sequences: sequences.clone(),
    };
    let secrets = dir.path().join("secrets");
    let s = secrets.to_string_lossy().into_owned();
    script(
        "deploy/pod/make-secret.sh",
        &[],
        &[
            ("TRACKER_DCS_SECRETS", &s),
            ("TRACKER_DCS_SECRET_NAME", &secret),
        ],
    );
    let operator = std::fs::read_to_string(secrets.join("mqtt-operator.secret")).unwrap();
    let cm = dir.path().join("configmap.yaml");
    let cm_text = script("deploy/pod/configmap.sh", &[], &[])
        .replace("name: tracker-dcs-config\n", &format!("name: {config}\n"));
    std::fs::write(&cm, cm_text).unwrap();
    let seq_cm = dir.path().join("configmap-burnin.yaml");
    let seq_text = script("deploy/pod/configmap.sh", &["burnin"], &[]).replace(
        "name: tracker-dcs-burnin\n",
        &format!("name: {sequences}\n"),
    );
    std::fs::write(&seq_cm, seq_text).unwrap();
    ok(
        podman(&[
            "kube",
            "play",
            "--replace",
            "--configmap",
            &cm.to_string_lossy(),
            "--configmap",
            &seq_cm.to_string_lossy(),
            &pod_file.to_string_lossy(),
        ]),
        "podman kube play",
    );

    // Anonymous and wrong passwords are refused; the operator gets in.
    let anon = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "#",
            "-C",
            "1",
            "-W",
            "5",
        ])
        .output()
        .unwrap();
    assert!(!anon.status.success(), "anonymous client accepted");
    let mut obs = connect(port, operator.trim()).await;

    // The services report from their simulators.
    let s = wait(&mut obs, "dcs/status", |v| v["fsm_state"] == "LV_OFF").await;
    assert_eq!(s["fsm_state"], "LV_OFF");
    wait(&mut obs, "julabo/status", |v| v["fsm_state"] == "OFF").await;
    wait(&mut obs, "MARTA/status", |v| v["fsm_state"] == "CONNECTED").await;
    wait(&mut obs, "interlock/status", |v| v["state"] == "OK").await;
    // The sequencer, with its sequences from their own ConfigMap.
    wait(&mut obs, "burnin/status", |v| v["state"] == "idle").await;
    // A command and its effect in the next status.
    obs.publish("julabo/cmd/start", "").await;
    let r = wait(&mut obs, "julabo/reply", |v| {
        v["topic"] == "julabo/cmd/start"
    })
    .await;
    assert_eq!(r["ok"], true, "{r}");
    wait(&mut obs, "julabo/status", |v| v["running"] == true).await;
    wait(&mut obs, "telemetry/stats", |v| {
        v["spool_bytes"].as_u64() > Some(0)
    })
    .await;

    // SIGTERM reaches every binary as PID 1: all exit 0 well before podman's 10 s kill.
    let t0 = Instant::now();
    ok(
        podman(&["pod", "stop", "-t", "10", &pod]),
        "podman pod stop",
    );
    println!("pod stopped in {:.1} s", t0.elapsed().as_secs_f64());
    let codes = ok(
        podman(&[
            "ps",
            "-a",
            "--filter",
            &format!("pod={pod}"),
            "--format",
            "{{.Names}} {{.ExitCode}}",
        ]),
        "podman ps",
    );
    let containers: Vec<&str> = codes.lines().filter(|l| !l.contains("-infra ")).collect();
    assert_eq!(containers.len(), 12, "{codes}");
    for c in &containers {
        assert!(
            c.ends_with(" 0"),
            "not a clean exit (137 = killed after 10 s): {c}\n{codes}"
        );
    }

    // Backup, lose the volume, restore: the data is back.
    let backups = dir.path().join("backups");
    let b = backups.to_string_lossy().into_owned();
    script("deploy/backup.sh", &[&b, &volume], &[]);
    let before = tar_listing(&backups.join(format!("{volume}.tar")));
    assert!(
        before.iter().any(|f| f.ends_with("caen-sim-state.json")),
        "{before:?}"
    );
    assert!(
        before.iter().any(|f| f.contains("telemetry/")),
        "{before:?}"
    );
    ok(
        podman(&["kube", "down", &pod_file.to_string_lossy()]),
        "podman kube down",
    );
    podman(&["volume", "rm", "-f", &volume]);
    script("deploy/restore.sh", &[&b, &volume], &[]);
    let again = dir.path().join("again.tar");
    ok(
        podman(&[
            "volume",
            "export",
            &volume,
            "--output",
            &again.to_string_lossy(),
        ]),
        "volume export",
    );
    assert_eq!(tar_listing(&again), before);
    assert_eq!(
        tar_file(&again, "caen-sim-state.json"),
        tar_file(
            &backups.join(format!("{volume}.tar")),
            "caen-sim-state.json"
        )
    );
}

async fn connect(port: u16, password: &str) -> Observer {
    let deadline = Instant::now() + WAIT;
    loop {
        // kube play starts everything at once: the broker may not listen yet.
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Observer::connect_as(
                port,
                "pod-test",
                "operator",
                password,
                &[
                    "dcs/status",
                    "julabo/#",
                    "MARTA/status",
                    "interlock/status",
                    "telemetry/stats",
                    "burnin/status",
                ],
            )
            .await;
        }
        assert!(Instant::now() < deadline, "broker never listened on {port}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait(obs: &mut Observer, topic: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let g = obs
        .wait_for(topic, WAIT, |p| pred(&json(p)))
        .await
        .unwrap_or_else(|| panic!("nothing suitable on {topic}"));
    json(&g.payload)
}

fn tar_listing(tar: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("-tf").arg(tar).output().unwrap();
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn tar_file(tar: &Path, suffix: &str) -> Vec<u8> {
    let name = tar_listing(tar)
        .into_iter()
        .find(|f| f.ends_with(suffix))
        .unwrap_or_default();
    Command::new("tar")
        .arg("-xOf")
        .arg(tar)
        .arg(&name)
        .output()
        .unwrap()
        .stdout
}
