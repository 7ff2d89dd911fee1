//! `julabo-sim`: a Julabo circulator that real clients talk to over TCP (as through a
//! ser2net/nc tunnel), over a pseudo-terminal it creates, or over an existing tty (one
//! end of a `socat` pty pair). A control port lets tests inject faults.
//!
//! Control port protocol (one command per line, answered `ok`, `error: ...` or JSON):
//! `state` (JSON snapshot), `silent on|off`, `garbage on|off`, `alarm <code>|clear`,
//! `remote on|off` (front-panel remote/manual key), `setpoint N T` (set-point N from the
//! front panel), `drop` (close TCP clients).

pub mod device;
pub mod server;

pub use device::{Device, DeviceConfig};
pub use server::{run, SimConfig};

/// The `julabo-sim` program (see [`dcs_shared::program`]).
pub struct JulaboSim;

impl dcs_shared::program::Program for JulaboSim {
    const NAME: &'static str = "julabo-sim";
    const ABOUT: &'static str = "Simulated Julabo circulator (SPEC 5).";
    type Config = SimConfig;

    fn resolve_paths(cfg: &mut SimConfig, file: &std::path::Path) {
        for p in [&mut cfg.pty, &mut cfg.serial].into_iter().flatten() {
            *p = dcs_shared::config::relative_to(file, p);
        }
    }
    async fn run(
        cfg: SimConfig,
        _file: std::path::PathBuf,
        _mqtt: dcs_shared::MqttSettings,
        shutdown: dcs_shared::shutdown::CancellationToken,
    ) -> anyhow::Result<()> {
        run(cfg, shutdown).await
    }
}
