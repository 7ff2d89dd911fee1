//! The one place where components are registered.
//!
//! `dcs up` runs each enabled component as a child process of its own (`dcs run NAME`),
//! so a crash in one never takes another down, and the launcher can restart it. A new
//! service or simulator adds one [`Component`] to [`COMPONENTS`]; nothing else in the
//! launcher changes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use dcs_shared::shutdown::CancellationToken;

use crate::stack::StackConfig;

/// What a component is, which decides when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The embedded broker: runs when the stack config has a `broker:` section.
    Broker,
    /// A service: runs when listed under `services:`.
    Service,
    /// A hardware simulator: runs under `simulators:` with `dcs up --simulate` only.
    Simulator,
}

impl Kind {
    /// The word for it in messages.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Broker => "broker",
            Kind::Service => "service",
            Kind::Simulator => "simulator",
        }
    }
}

/// A future returned by [`Component::run`].
pub type RunFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Everything the launcher knows about one component.
pub struct Component {
    /// Name in the stack config and on the command line.
    pub name: &'static str,
    /// When it runs.
    pub kind: Kind,
    /// Checks the component's own config file; used by `dcs check` and before `dcs up`.
    /// Returns the MQTT client id the component connects with (None: no MQTT), which
    /// `dcs up` makes an account of its own.
    pub check: fn(&StackConfig, Option<&Path>) -> anyhow::Result<Option<String>>,
    /// Runs the component in this process until `shutdown` is cancelled.
    pub run: fn(StackConfig, Option<PathBuf>, CancellationToken) -> RunFuture,
}

/// Every component the launcher can run.
pub static COMPONENTS: &[Component] = &[
    crate::components::BROKER,
    crate::components::CAEN,
    crate::components::JULABO,
    crate::components::TELEMETRY,
    crate::components::INTERLOCK,
    crate::components::PH2ACF,
    crate::components::CAEN_SIM,
    crate::components::JULABO_SIM,
    crate::components::ENV_SIM,
    crate::components::PH2ACF_SIM,
];

/// The registered component called `name`, if it is of `kind`.
pub fn find(name: &str, kind: Kind) -> Option<&'static Component> {
    COMPONENTS.iter().find(|c| c.name == name && c.kind == kind)
}

/// Names of the registered components of `kind`.
pub fn names(kind: Kind) -> Vec<&'static str> {
    let v: Vec<_> = COMPONENTS
        .iter()
        .filter(|c| c.kind == kind)
        .map(|c| c.name)
        .collect();
    if v.is_empty() {
        vec!["(none yet)"]
    } else {
        v
    }
}
