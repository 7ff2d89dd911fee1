//! `tracing` setup shared by every binary.
//!
//! One line per event on stderr. `RUST_LOG` (or `DCS_LOG`) selects levels with the usual
//! `EnvFilter` syntax; `DCS_LOG_FORMAT=json` switches to one JSON object per line for log
//! collectors.

use tracing::Metadata;
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Two library events that are normal operation but logged as trouble; a healthy stack
/// must be quiet (the healthy-stack test in `tests/tests/launcher.rs` fails if an
/// upgrade moves them):
/// - rumqttd 0.20 logs every clean client disconnect as ERROR `router-drop`
///   (`server/broker.rs`: the router closes the link after the client's DISCONNECT);
/// - epics-ca-rs 0.31 logs at WARN each beacon anomaly (`client/mod.rs`), and every
///   step of a CA server's standard start-up ramp (beacons 20 ms apart, doubling to
///   15 s) is one by libca's rule (period >= 3.25x the running average); libca only
///   counts them. caen-fsm logs CA connection loss and recovery itself.
fn benign(meta: &Metadata<'_>) -> bool {
    let at = |file: &str, lines: std::ops::RangeInclusive<u32>| {
        meta.file().is_some_and(|f| f.ends_with(file))
            && meta.line().is_some_and(|l| lines.contains(&l))
    };
    match meta.target() {
        "rumqttd::server::broker" => at("src/server/broker.rs", 581..=581),
        "epics_ca_rs::client" => {
            at("src/client/mod.rs", 3879..=3879) && meta.fields().field("kind").is_some()
        }
        _ => false,
    }
}

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
    let filter = filter.and(filter_fn(|meta| !benign(meta)));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // When stderr breaks (the launcher holding our pipe died), tracing reports it
        // with eprintln!, which panics on that same broken stderr and takes the task
        // with it. A service must outlive its log reader: drop the line instead.
        .log_internal_errors(false)
        .with_target(true);
    let _ = if json {
        tracing_subscriber::registry()
            .with(layer.json().flatten_event(true).with_filter(filter))
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(layer.compact().with_ansi(false).with_filter(filter))
            .try_init()
    };
}
