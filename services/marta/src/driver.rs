//! Talking to the plant: a poll reads every span of the map; a command's plan is
//! carried out write by write, each read back; a failure makes the plant
//! DISCONNECTED with the reason, and the connection is made again with backoff.

use std::time::{Duration, Instant};

use dcs_shared::backoff::Backoff;
use dcs_shared::UtcNanos;

use crate::commands::{self, MartaCommand, Op};
use crate::config::MartaConfig;
use crate::fsm::State;
use crate::plant::Plant;
use crate::registers::{decode_f32, encode_f32, Image};
use crate::transport::{Transport, TransportError};

/// The plant and the line to it.
pub struct Driver {
    cfg: MartaConfig,
    transport: Transport,
    /// The plant as last read.
    pub plant: Plant,
    backoff: Backoff,
    next_connect: Instant,
    ever_answered: bool,
}

/// Failed connects after the start before a plant that never answered is a warning.
const STARTUP_ATTEMPTS: u32 = 4;

impl Driver {
    /// A driver for `cfg` (its register map loaded); not connected yet.
    pub fn new(cfg: MartaConfig) -> Result<Self, String> {
        let map = cfg
            .map
            .clone()
            .ok_or("the register map was not loaded (marta::Marta::load_files)")?;
        let plant = Plant::new(map, &cfg.coldest_of)?;
        let c = &cfg.connection;
        let transport = Transport::new(
            &c.host,
            c.port,
            c.unit_id,
            Duration::from_millis(c.connect_timeout_ms),
            Duration::from_millis(c.request_timeout_ms),
        );
        let backoff = Backoff::new(
            Duration::from_millis(c.reconnect_min_ms),
            Duration::from_secs_f64(c.reconnect_max_secs),
        );
        Ok(Driver {
            cfg,
            transport,
            plant,
            backoff,
            next_connect: Instant::now(),
            ever_answered: false,
        })
    }

    /// `host:port` of the PLC.
    pub fn peer(&self) -> String {
        self.transport.peer()
    }

    fn lost(&mut self, e: &TransportError) {
        let was = self.plant.state();
        let why = e.to_string();
        let peer = self.transport.peer();
        if was != State::Disconnected && was != State::Init {
            tracing::warn!(%peer, error = %why, "MARTA not answering: DISCONNECTED");
        } else if !self.ever_answered && self.backoff.attempts() == STARTUP_ATTEMPTS {
            // Starting together with its simulator or gateway is not worth a warning;
            // a plant that never answers is.
            tracing::warn!(%peer, error = %why, "MARTA has not answered since the start");
        } else {
            tracing::debug!(%peer, error = %why, "MARTA not answering");
        }
        self.plant.failed(why);
        if !self.transport.is_connected() {
            self.next_connect = Instant::now() + self.backoff.next_delay();
        }
    }

    /// Connects if needed and allowed by the backoff, then reads everything. `false`
    /// when the plant could not be read (its state says why).
    pub async fn poll(&mut self) -> bool {
        let reused = self.transport.is_connected();
        if !reused {
            if Instant::now() < self.next_connect {
                return false;
            }
            if let Err(e) = self.transport.connect().await {
                self.lost(&e);
                return false;
            }
        }
        let at = UtcNanos::now();
        let mut read = self.read_all().await;
        // A connection the PLC (or a gateway) closed while idle is only found out by
        // using it: one fresh connection before calling the plant lost.
        if reused && matches!(read, Err(TransportError::Io { .. })) {
            tracing::debug!(peer = %self.transport.peer(), "connection closed while idle: connecting again");
            read = match self.transport.connect().await {
                Ok(()) => self.read_all().await,
                Err(e) => Err(e),
            };
        }
        let image = match read {
            Ok(image) => image,
            Err(e) => {
                self.lost(&e);
                return false;
            }
        };
        let was = self.plant.state();
        self.plant.polled(image, at);
        self.backoff.reset();
        self.ever_answered = true;
        let now = self.plant.state();
        if was != now {
            tracing::info!(
                from = was.as_str(),
                to = now.as_str(),
                error = self.plant.error(),
                "MARTA state"
            );
        }
        true
    }

    async fn read_all(&mut self) -> Result<Image, TransportError> {
        let mut image = Image::default();
        for span in self.plant.map().spans.clone() {
            let words = self.transport.read(span).await?;
            image.fill(span, &words);
        }
        Ok(image)
    }

    /// Carries out `cmd`; `Err` says why it was refused or failed. The plant is read
    /// first (a command is checked against the plant as it is now, not as the last
    /// poll saw it), writes are read back, and the plant is read again afterwards so
    /// the reply and the status show the result.
    pub async fn execute(&mut self, cmd: MartaCommand) -> Result<(), String> {
        if matches!(cmd, MartaCommand::Refresh | MartaCommand::Reconnect) {
            let what = if cmd == MartaCommand::Reconnect {
                self.transport.close();
                self.next_connect = Instant::now();
                "reconnect failed"
            } else {
                "MARTA did not answer"
            };
            return if self.poll().await {
                Ok(())
            } else {
                Err(format!(
                    "{what}: {}",
                    self.plant.error().unwrap_or("not connected")
                ))
            };
        }
        self.poll().await;
        let ops = commands::plan(
            cmd,
            self.plant.snapshot(),
            &self.plant.map().controls,
            &self.cfg.limits,
            Duration::from_millis(self.cfg.timing.reset_pulse_ms),
        )
        .map_err(|refusal| match self.plant.error() {
            Some(why) if self.plant.state() == State::Disconnected => format!("{refusal} ({why})"),
            _ => refusal,
        })?;
        let result = self.carry_out(&ops).await;
        if let Err(e) = &result {
            tracing::warn!(command = ?cmd, error = %e, "MARTA command failed");
        }
        // Show the effect (or the state the failure left).
        self.poll().await;
        result
    }

    async fn carry_out(&mut self, ops: &[Op]) -> Result<(), String> {
        let reset = self.plant.map().controls.alarm_reset;
        // Set once a write may have set the reset bit: cleared again whatever happens.
        let mut reset_may_be_set = false;
        let mut result = Ok(());
        for op in ops {
            if let Op::Bits { register, set, .. } = *op {
                reset_may_be_set |= register == reset.register && set & reset.mask() != 0;
            }
            if let Err(e) = self.carry_out_one(*op).await {
                result = Err(e);
                break;
            }
            if let Op::Bits {
                register, clear, ..
            } = *op
            {
                if register == reset.register && clear & reset.mask() != 0 {
                    reset_may_be_set = false;
                }
            }
        }
        if result.is_err() && reset_may_be_set {
            // A reset bit left set would hide the next pulse's rising edge (or hold
            // the PLC in reset): one more try, on a fresh connection if need be.
            if !self.transport.is_connected() {
                let _ = self.transport.connect().await;
            }
            let op = Op::Bits {
                register: reset.register,
                set: 0,
                clear: reset.mask(),
                require: 0,
                confirm: reset.mask(),
            };
            if let Err(e) = self.carry_out_one(op).await {
                tracing::warn!(error = %e, "the alarm-reset bit may be left set");
            }
        }
        result
    }

    async fn carry_out_one(&mut self, op: Op) -> Result<(), String> {
        let order = self.plant.map().word_order;
        match op {
            Op::Pause(d) => tokio::time::sleep(d).await,
            Op::Bits {
                register,
                set,
                clear,
                require,
                confirm,
            } => {
                let t = &mut self.transport;
                let step = async {
                    let read = t.read(span1(register)).await?[0];
                    if read & require != require {
                        return Ok(Err(format!(
                            "the plant changed: control word {register} reads {read:#06x} (bits {require:#06x} needed): nothing written"
                        )));
                    }
                    let word = commands::apply_bits(read, set, clear);
                    t.write_one(register, word).await?;
                    Ok::<_, TransportError>(Ok((word, t.read(span1(register)).await?[0])))
                };
                let (word, back) = match step.await {
                    Ok(Ok(v)) => v,
                    Ok(Err(refusal)) => return Err(refusal),
                    Err(e) => {
                        let why = e.to_string();
                        self.lost(&e);
                        return Err(why);
                    }
                };
                if !commands::bits_confirmed(back, set, confirm) {
                    return Err(format!(
                        "MARTA did not take it: control word {register} reads {back:#06x} after writing {word:#06x}"
                    ));
                }
            }
            Op::Float { register, value } => {
                let words = encode_f32(value, order);
                let t = &mut self.transport;
                let step = async {
                    t.write_many(register, &words).await?;
                    t.read(crate::registers::Span {
                        start: register,
                        count: 2,
                    })
                    .await
                };
                let back = match step.await {
                    Ok(v) => v,
                    Err(e) => {
                        let why = e.to_string();
                        self.lost(&e);
                        return Err(why);
                    }
                };
                if back != words {
                    let got = decode_f32([back[0], back[1]], order);
                    return Err(format!(
                        "MARTA did not take it: register {register} reads {got} after writing {value}"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn span1(register: u16) -> crate::registers::Span {
    crate::registers::Span {
        start: register,
        count: 1,
    }
}
