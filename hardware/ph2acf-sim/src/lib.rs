//! `ph2acf-sim`: a Ph2_ACF that real clients drive, for tests and `dcs up --simulate`.
//!
//! - Middleware mode (default): a MiddlewareController on TCP (SPEC 6.1), one client
//!   at a time, commands only valid in order ([`protocol`]), runs executed by
//!   [`server`] that write a results directory like the real one ([`run`]).
//! - Command-line mode (`ph2acf-sim cli ... -b -f <xml> -c <name>`, see [`cli`]):
//!   behaves like `runCalibration`.
//!
//! Fault injection (config `fault: {kind: hang|crash|drop, at_percent: N}`): hang,
//! crash mid-run leaving a partial directory, drop the connection; an unknown
//! calibration is rejected.

pub mod cli;
pub mod config;
pub mod protocol;
pub mod run;
pub mod server;

pub use config::SimConfig;
pub use server::run;
