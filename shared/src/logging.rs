//! `tracing` setup shared by every binary.
//!
//! One line per event on stderr. `RUST_LOG` (or `DCS_LOG`) selects levels with the usual
//! `EnvFilter` syntax; `DCS_LOG_FORMAT=json` switches to one JSON object per line for log
//! collectors.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call twice (the second call is ignored), so
/// tests and the launcher's in-process helpers do not fight over it.
pub fn init(default_level: &str) {
    let filter = std::env::var("DCS_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        // rumqttd logs every accept at info and every normal disconnect as a routing
        // "error"; keep its other warnings only. The EPICS crates log every channel
        // connection at info (27 lines per CAEN channel).
        .unwrap_or_else(|| {
            EnvFilter::new(format!(
                "{default_level},rumqttd=warn,rumqttd::router::routing=off,\
                 epics_ca_rs=warn,epics_base_rs=warn"
            ))
        });
    let json = std::env::var("DCS_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr breaks (the launcher holding our pipe died), tracing reports it
        // with eprintln!, which panics on that same broken stderr and takes the task
        // with it. A service must outlive its log reader: drop the line instead.
        .log_internal_errors(false)
        .with_target(true);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.compact().with_ansi(false).try_init()
    };
}
