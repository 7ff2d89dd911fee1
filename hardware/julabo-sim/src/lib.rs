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
