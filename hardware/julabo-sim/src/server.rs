//! The simulator's front ends: TCP listener, pseudo-terminal, existing tty, control port.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use dcs_shared::shutdown::CancellationToken;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::device::{is_alarm, Device, DeviceConfig};

/// Where the simulator listens and how the unit behaves (its YAML config).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Serve the unit on TCP (raw, like ser2net/nc).
    #[serde(default)]
    pub tcp: Option<SocketAddr>,
    /// Create a pseudo-terminal and link its device here.
    #[serde(default)]
    pub pty: Option<PathBuf>,
    /// Open an existing tty (e.g. one end of a socat pair) as the unit's serial port.
    #[serde(default)]
    pub serial: Option<PathBuf>,
    /// Fault-injection control port.
    #[serde(default)]
    pub control: Option<SocketAddr>,
    /// The unit.
    #[serde(default)]
    pub device: DeviceConfig,
}

impl dcs_shared::Validate for SimConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.tcp.is_none() && self.pty.is_none() && self.serial.is_none() {
            return Err(("tcp".into(), "give at least one of tcp, pty, serial".into()));
        }
        if !matches!(self.device.power_pv, 1 | 2) {
            return Err(("device.power_pv".into(), "must be 1 or 2".into()));
        }
        let d = &self.device;
        // The bath model divides by tau: a negative or zero one would be quietly clamped.
        if !(d.tau_secs.is_finite() && d.tau_secs >= 0.1 && d.tau_secs <= 86_400.0) {
            return Err((
                "device.tau_secs".into(),
                "must be 0.1 .. 86400 s (the bath's time constant)".into(),
            ));
        }
        for (key, v) in [
            ("device.ambient", d.ambient),
            ("device.setpoint_min", d.setpoint_min),
            ("device.setpoint_max", d.setpoint_max),
        ] {
            if !(-100.0..=400.0).contains(&v) {
                return Err((
                    key.into(),
                    "must be a temperature in -100 .. 400 degC".into(),
                ));
            }
        }
        if d.setpoint_min >= d.setpoint_max {
            return Err((
                "device.setpoint_max".into(),
                "must be above device.setpoint_min".into(),
            ));
        }
        Ok(())
    }
}

type Shared = Arc<Mutex<Device>>;

/// Runs the simulator until `shutdown`. Prints one `julabo-sim: ...` line per front end
/// once it is ready.
pub async fn run(cfg: SimConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dev: Shared = Arc::new(Mutex::new(Device::new(cfg.device.clone(), Instant::now())));
    let (drop_tx, _) = broadcast::channel::<()>(4);
    let mut tasks = tokio::task::JoinSet::new();

    if let Some(addr) = cfg.tcp {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("julabo-sim: tcp listening on {}", l.local_addr()?);
        let (dev, drop_tx) = (dev.clone(), drop_tx.clone());
        tasks.spawn(async move {
            while let Ok((sock, peer)) = l.accept().await {
                tracing::info!(%peer, "client connected");
                let _ = sock.set_nodelay(true);
                let (dev, drop_rx) = (dev.clone(), drop_tx.subscribe());
                tokio::spawn(async move {
                    let _ = serve(sock, dev, Some(drop_rx)).await;
                    tracing::info!(%peer, "client gone");
                });
            }
        });
    }
    if let Some(link) = &cfg.pty {
        let (master, slave) = open_pty(link)?;
        println!("julabo-sim: pty at {}", link.display());
        let dev = dev.clone();
        tasks.spawn(async move {
            // The slave stays open here so the master never reads EIO between clients.
            let _slave = slave;
            if let Err(e) = serve(master, dev, None).await {
                tracing::error!(error = %e, "pty closed");
            }
        });
    }
    if let Some(path) = &cfg.serial {
        let f = open_tty(path)?;
        println!("julabo-sim: serial on {}", path.display());
        let dev = dev.clone();
        tasks.spawn(async move {
            if let Err(e) = serve(f, dev, None).await {
                tracing::error!(error = %e, "serial line closed");
            }
        });
    }
    if let Some(addr) = cfg.control {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("julabo-sim: control on {}", l.local_addr()?);
        let dev = dev.clone();
        tasks.spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                tokio::spawn(control(sock, dev.clone(), drop_tx.clone()));
            }
        });
    }
    shutdown.cancelled().await;
    tasks.abort_all();
    if let Some(link) = &cfg.pty {
        let _ = std::fs::remove_file(link);
    }
    Ok(())
}

/// Serves the unit on one byte stream: commands end at CR (or LF), replies end CRLF.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    dev: Shared,
    mut drop_rx: Option<broadcast::Receiver<()>>,
) -> std::io::Result<()> {
    let (mut r, mut w) = tokio::io::split(stream);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = tokio::select! {
            n = r.read(&mut chunk) => n?,
            _ = async { match drop_rx.as_mut() { Some(rx) => { let _ = rx.recv().await; } None => std::future::pending().await } } => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(i) = buf.iter().position(|&b| b == b'\r' || b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let reply = {
                let Ok(mut d) = dev.lock() else { return Ok(()) };
                if d.faults.silent {
                    None
                } else {
                    let garbage = d.faults.garbage;
                    d.handle(&line, Instant::now()).map(|r| {
                        if garbage {
                            "\u{15}#?!\u{7f}x9".to_string()
                        } else {
                            r
                        }
                    })
                }
            };
            if let Some(reply) = reply {
                w.write_all(format!("{reply}\r\n").as_bytes()).await?;
                w.flush().await?;
            }
        }
        if buf.len() > 4096 {
            buf.clear(); // a line that never ends is noise
        }
    }
}

async fn control(sock: tokio::net::TcpStream, dev: Shared, drop_tx: broadcast::Sender<()>) {
    let (r, mut w) = sock.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = {
            let Ok(mut d) = dev.lock() else { return };
            match words.as_slice() {
                ["state"] => serde_json::to_string(&d.snapshot(Instant::now())).unwrap_or_default(),
                ["silent", v] | ["garbage", v] | ["remote", v] => match *v {
                    "on" | "off" => {
                        let on = *v == "on";
                        match words[0] {
                            "silent" => d.faults.silent = on,
                            "garbage" => d.faults.garbage = on,
                            _ => d.set_remote(on),
                        }
                        "ok".into()
                    }
                    _ => "error: use on or off".into(),
                },
                ["alarm", "clear"] => {
                    d.faults.alarm = None;
                    "ok".into()
                }
                ["alarm", code] => match code.parse::<i8>() {
                    Ok(c) if is_alarm(c) => {
                        d.faults.alarm = Some(c);
                        "ok".into()
                    }
                    _ => "error: alarm code must be -1..-14".into(),
                },
                ["setpoint", n, t] => match (n.parse::<usize>(), t.parse::<f64>()) {
                    (Ok(n), Ok(t)) if n >= 1 => match d.panel_setpoint(n - 1, t) {
                        Ok(()) => "ok".into(),
                        Err(e) => format!("error: {e}"),
                    },
                    _ => "error: setpoint N T, N in 1..3".into(),
                },
                ["drop"] => {
                    let _ = drop_tx.send(());
                    "ok".into()
                }
                _ => "error: commands are state, silent on|off, garbage on|off, alarm N|clear, remote on|off, setpoint N T, drop".into(),
            }
        };
        if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

fn make_raw(fd: impl AsFd) -> anyhow::Result<()> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let mut t = tcgetattr(&fd).context("tcgetattr")?;
    cfmakeraw(&mut t);
    tcsetattr(&fd, SetArg::TCSANOW, &t).context("tcsetattr")?;
    Ok(())
}

/// Creates a raw pseudo-terminal, links `link` to its device, returns (master, slave).
fn open_pty(link: &Path) -> anyhow::Result<(tokio::fs::File, std::os::fd::OwnedFd)> {
    let pty = nix::pty::openpty(None, None).context("openpty")?;
    make_raw(&pty.slave)?;
    make_raw(&pty.master)?;
    let name = nix::unistd::ttyname(&pty.slave).context("ttyname")?;
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).with_context(|| format!("removing old {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&name, link)
        .with_context(|| format!("linking {}", link.display()))?;
    let master = std::fs::File::from(pty.master);
    Ok((tokio::fs::File::from_std(master), pty.slave))
}

fn open_tty(path: &Path) -> anyhow::Result<tokio::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    make_raw(&f)?;
    Ok(tokio::fs::File::from_std(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_values_out_of_range_name_their_key_and_line() {
        let load = |text: &str| {
            dcs_shared::config::from_str::<SimConfig>(text, std::path::Path::new("sim.yaml"))
        };
        let e = load("tcp: 127.0.0.1:0\ndevice:\n  ambient: 20\n  tau_secs: -60\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("device.tau_secs"));
        assert_eq!(e.line, Some(4));
        let e =
            load("tcp: 127.0.0.1:0\ndevice: {setpoint_min: 50, setpoint_max: 20}\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("device.setpoint_max"));
        assert_eq!(e.line, Some(2));
        assert!(load("tcp: 127.0.0.1:0\ndevice: {tau_secs: 30}\n").is_ok());
    }
}
