//! The one place where components are registered.
//!
//! `dcs up` runs each enabled component as a child process of its own (`dcs run NAME`),
//! so a crash in one never takes another down, and the launcher can restart it. A new
//! service or simulator implements [`Program`] once and adds one line to
//! [`COMPONENTS`]; nothing else in the launcher changes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use dcs_shared::program::{self, Program};

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
    /// Runs the component in this process until SIGTERM (what `dcs up` starts for each
    /// child), on a runtime of its own; with `true`, prints its `--check` line instead.
    /// The exit code is the component's: 2 for a configuration error, 1 at run time.
    pub run: fn(StackConfig, Option<PathBuf>, bool) -> ExitCode,
}

impl Component {
    /// The component of a [`Program`]: the code its own binary runs, with the stack's
    /// MQTT account for its client id.
    pub const fn program<P: Program>(kind: Kind) -> Component {
        Component {
            name: P::NAME,
            kind,
            check: check_program::<P>,
            run: run_program::<P>,
        }
    }
}

fn check_program<P: Program>(
    _: &StackConfig,
    file: Option<&Path>,
) -> anyhow::Result<Option<String>> {
    let file =
        file.with_context(|| format!("`{}` needs `config: FILE` in the stack config", P::NAME))?;
    let cfg = program::load::<P>(file)?;
    Ok(P::client_id(&cfg))
}

fn run_program<P: Program>(stack: StackConfig, file: Option<PathBuf>, check: bool) -> ExitCode {
    P::before_threads();
    let Some(file) = file else {
        eprintln!("{}: needs `config: FILE` in the stack config", P::NAME);
        return ExitCode::from(2);
    };
    let cfg = match program::load::<P>(&file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", P::NAME);
            return ExitCode::from(2);
        }
    };
    if check {
        println!("{}", program::check_line::<P>(&file, &cfg));
        return ExitCode::SUCCESS;
    }
    let mqtt = P::client_id(&cfg)
        .map(|id| stack.mqtt_for(&id))
        .unwrap_or_default();
    program::execute::<P>(cfg, file, mqtt)
}

/// Every component the launcher can run.
pub static COMPONENTS: &[Component] = &[
    crate::components::BROKER,
    Component::program::<caen::CaenFsm>(Kind::Service),
    Component::program::<julabo::Julabo>(Kind::Service),
    Component::program::<marta::Marta>(Kind::Service),
    Component::program::<telemetry::Telemetry>(Kind::Service),
    Component::program::<interlock::Interlock>(Kind::Service),
    Component::program::<notifier::Notifier>(Kind::Service),
    Component::program::<ph2acf::Bridge>(Kind::Service),
    Component::program::<burnin::Burnin>(Kind::Service),
    Component::program::<caen_sim::CaenSim>(Kind::Simulator),
    Component::program::<julabo_sim::JulaboSim>(Kind::Simulator),
    Component::program::<marta_sim::MartaSim>(Kind::Simulator),
    Component::program::<env_sim::EnvSim>(Kind::Simulator),
    Component::program::<ph2acf_sim::Ph2acfSim>(Kind::Simulator),
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
