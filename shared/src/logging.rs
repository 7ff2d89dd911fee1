//! `tracing` setup shared by every binary.
//!
//! One line per event on stderr. `RUST_LOG` (or `DCS_LOG`) selects levels with the usual
//! `EnvFilter` syntax; `DCS_LOG_FORMAT=json` switches to one JSON object per line for log
//! collectors.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata};
use tracing_subscriber::filter::{FilterExt, LevelFilter};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Two library events that are normal operation but logged as trouble; a healthy stack
/// must be quiet (the healthy-stack test in `tests/tests/launcher.rs` fails if an
/// upgrade moves them). Only these values are dropped; the same callsites' other
/// values (a router that cannot take a message, an IOC restart) still show:
/// - rumqttd 0.20 logs every clean client disconnect as ERROR `router-drop` with
///   `error=Recv(Disconnected)` (`server/broker.rs`: the router drops the link after
///   the client's DISCONNECT);
/// - epics-ca-rs 0.31 logs at WARN each beacon anomaly (`client/mod.rs`), and every
///   step of a CA server's start-up ramp (beacons 20 ms apart, doubling to 15 s) is a
///   `kind=LongPeriod` one by libca's rule (period >= 3.25x the running average); libca
///   only counts them.
struct Benign;

/// Which of the two callsites `meta` is, if any.
fn benign_callsite(meta: &Metadata<'_>) -> Option<(&'static str, &'static str)> {
    let at = |file: &str, line: u32| {
        meta.file().is_some_and(|f| f.ends_with(file)) && meta.line() == Some(line)
    };
    match meta.target() {
        "rumqttd::server::broker" if at("src/server/broker.rs", 581) => Some(("error", "Recv(")),
        "epics_ca_rs::client" if at("src/client/mod.rs", 3879) => Some(("kind", "LongPeriod")),
        _ => None,
    }
}

/// One field's value as text.
struct FieldText<'a>(&'a str, String);

impl Visit for FieldText<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.0 {
            let _ = write!(self.1, "{value:?}");
        }
    }
}

impl<S> Filter<S> for Benign {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        // "Sometimes" for the two callsites: their events are judged one by one.
        if benign_callsite(meta).is_some() {
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let Some((field, benign)) = benign_callsite(event.metadata()) else {
            return true;
        };
        let mut v = FieldText(field, String::new());
        event.record(&mut v);
        !v.1.starts_with(benign)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // Lets the EnvFilter's own hint stand (a `None` here would switch it off and
        // make every trace-level callsite of every crate ask at run time).
        Some(LevelFilter::TRACE)
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
    let filter = filter.and(Benign);
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
