//! The simulator's front ends: the Modbus TCP server (tokio-modbus) serving exactly the
//! registers of the map, and the fault-injection control port.

use std::collections::BTreeMap;
use std::future::{ready, Ready};
use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use dcs_shared::shutdown::CancellationToken;
use marta::registers::RegisterMap;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use crate::model::{Model, PlantConfig};

/// Where the simulator listens and how the plant behaves (its YAML config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Modbus TCP listener.
    pub tcp: SocketAddr,
    /// Fault-injection control port.
    #[serde(default)]
    pub control: Option<SocketAddr>,
    /// The register map (relative to this file): the driver's.
    pub register_map: PathBuf,
    /// The unit id answered (others get exception 0x0B).
    #[serde(default = "one")]
    pub unit_id: u8,
    /// The plant.
    #[serde(default)]
    pub plant: PlantConfig,
    /// The map read from `register_map`.
    #[serde(skip)]
    pub map: Option<RegisterMap>,
}

fn one() -> u8 {
    1
}

impl dcs_shared::Validate for SimConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let p = &self.plant;
        for (k, v) in [
            ("plant.chiller_tau_secs", p.chiller_tau_secs),
            ("plant.co2_tau_secs", p.co2_tau_secs),
        ] {
            if !(v.is_finite() && (0.1..=86_400.0).contains(&v)) {
                return Err((k.into(), "must be 0.1 .. 86400 s".into()));
            }
        }
        for (k, v) in [
            ("plant.ambient", p.ambient),
            ("plant.chiller_floor", p.chiller_floor),
        ] {
            if !(-100.0..=100.0).contains(&v) {
                return Err((k.into(), "must be a temperature in -100 .. 100 degC".into()));
            }
        }
        let [lo, hi] = p.setpoint_range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err((
                "plant.setpoint_range".into(),
                "must be [low, high] with low < high".into(),
            ));
        }
        if !(p.co2_without_chiller_secs.is_finite() && p.co2_without_chiller_secs >= 0.0) {
            return Err((
                "plant.co2_without_chiller_secs".into(),
                "must be >= 0".into(),
            ));
        }
        Ok(())
    }
}

/// Faults injected from the control port.
#[derive(Debug, Default)]
struct Faults {
    /// Requests get no answer.
    silent: bool,
    /// The connection is closed when a read arrives (dropped mid-read).
    drop_reads: bool,
    /// Every request is answered with this exception.
    exception: Option<u8>,
}

/// The plant, its clock, the faults and the open connections.
struct Sim {
    model: Model,
    last: Instant,
    faults: Faults,
    unit: u8,
    /// Clones of the clients' sockets, to close them from the control port.
    clients: BTreeMap<u64, std::net::TcpStream>,
    next_client: u64,
}

impl Sim {
    fn advance(&mut self) {
        let now = Instant::now();
        self.model
            .advance(now.duration_since(self.last).as_secs_f64());
        self.last = now;
    }
}

type Shared = Arc<Mutex<Sim>>;

/// One client's Modbus service.
struct Client {
    sim: Shared,
    id: u64,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sim.lock() {
            s.clients.remove(&self.id);
        }
    }
}

impl tokio_modbus::server::Service for Client {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: SlaveRequest<'static>) -> Self::Future {
        let Ok(mut sim) = self.sim.lock() else {
            return ready(Err(ExceptionCode::ServerDeviceFailure));
        };
        if sim.faults.silent {
            return ready(Ok(None));
        }
        if let Some(code) = sim.faults.exception {
            return ready(Err(ExceptionCode::new(code)));
        }
        if req.slave != sim.unit {
            return ready(Err(ExceptionCode::GatewayTargetDevice));
        }
        sim.advance();
        let answer = match req.request {
            Request::ReadHoldingRegisters(addr, count) => {
                if sim.faults.drop_reads {
                    if let Some(s) = sim.clients.get(&self.id) {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    return ready(Ok(None));
                }
                let img = sim.model.image();
                (0..count)
                    .map(|i| addr.checked_add(i).and_then(|r| img.word(r)))
                    .collect::<Option<Vec<u16>>>()
                    .filter(|_| count > 0 && count <= marta::registers::MAX_READ)
                    .map(Response::ReadHoldingRegisters)
                    .ok_or(ExceptionCode::IllegalDataAddress)
            }
            Request::WriteSingleRegister(addr, word) => sim
                .model
                .write(addr, &[word])
                .map(|()| Response::WriteSingleRegister(addr, word))
                .map_err(|e| {
                    tracing::debug!(error = %e, "write refused");
                    ExceptionCode::IllegalDataAddress
                }),
            Request::WriteMultipleRegisters(addr, words) => sim
                .model
                .write(addr, &words)
                .map(|()| Response::WriteMultipleRegisters(addr, words.len() as u16))
                .map_err(|e| {
                    tracing::debug!(error = %e, "write refused");
                    ExceptionCode::IllegalDataAddress
                }),
            _ => Err(ExceptionCode::IllegalFunction),
        };
        // A write takes effect at once (a reset edge, a start).
        sim.advance();
        ready(answer.map(Some))
    }
}

/// Runs the simulator until `shutdown`. Prints one `marta-sim: ...` line per listener
/// once it is ready.
pub async fn run(cfg: SimConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let map = cfg.map.clone().context("the register map was not loaded")?;
    let sim: Shared = Arc::new(Mutex::new(Sim {
        model: Model::new(cfg.plant.clone(), map),
        last: Instant::now(),
        faults: Faults::default(),
        unit: cfg.unit_id,
        clients: BTreeMap::new(),
        next_client: 0,
    }));
    let listener = TcpListener::bind(cfg.tcp)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.tcp))?;
    println!("marta-sim: modbus listening on {}", listener.local_addr()?);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = cfg.control {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("marta-sim: control on {}", l.local_addr()?);
        let sim = sim.clone();
        tasks.spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                tokio::spawn(control(sock, sim.clone()));
            }
        });
    }
    let server = Server::new(listener);
    let on_connected = |stream: TcpStream, peer: SocketAddr| {
        let sim = sim.clone();
        async move {
            tracing::info!(%peer, "client connected");
            let _ = stream.set_nodelay(true);
            // A clone of the socket stays here so that `drop` can close it.
            let std = stream.into_std()?;
            let keep = std.try_clone()?;
            let stream = TcpStream::from_std(std)?;
            let Ok(mut s) = sim.lock() else {
                return Ok(None);
            };
            let id = s.next_client;
            s.next_client += 1;
            s.clients.insert(id, keep);
            drop(s);
            Ok(Some((
                Client {
                    sim: sim.clone(),
                    id,
                },
                stream,
            )))
        }
    };
    let on_error = |e: std::io::Error| tracing::debug!(error = %e, "client connection ended");
    tokio::select! {
        r = server.serve(&on_connected, on_error) => r.context("modbus server")?,
        _ = shutdown.cancelled() => {}
    }
    tasks.abort_all();
    Ok(())
}

async fn control(sock: TcpStream, sim: Shared) {
    let (r, mut w) = sock.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = {
            let Ok(mut s) = sim.lock() else { return };
            s.advance();
            let on_off = |v: &str| match v {
                "on" => Some(true),
                "off" => Some(false),
                _ => None,
            };
            match words.as_slice() {
                ["state"] => serde_json::to_string(&s.model.snapshot()).unwrap_or_default(),
                ["silent" | "drop_reads" | "emergency", v] => match on_off(v) {
                    Some(on) => {
                        match words[0] {
                            "silent" => s.faults.silent = on,
                            "drop_reads" => s.faults.drop_reads = on,
                            _ => s.model.set_emergency(on),
                        }
                        "ok".into()
                    }
                    None => "error: use on or off".into(),
                },
                ["exception", "off"] => {
                    s.faults.exception = None;
                    "ok".into()
                }
                ["exception", code] => match code.parse::<u8>() {
                    Ok(c) if c > 0 => {
                        s.faults.exception = Some(c);
                        "ok".into()
                    }
                    _ => "error: exception takes a code 1..255 or off".into(),
                },
                ["alarm", name] => match s.model.raise(name) {
                    Ok(()) => "ok".into(),
                    Err(e) => format!("error: {e}"),
                },
                ["drop"] => {
                    for c in s.clients.values() {
                        let _ = c.shutdown(Shutdown::Both);
                    }
                    "ok".into()
                }
                _ => "error: commands are state, alarm NAME, emergency on|off, silent on|off, drop_reads on|off, exception CODE|off, drop".into(),
            }
        };
        if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}
