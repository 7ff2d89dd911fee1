//! How each registered component runs inside a `dcs run NAME` child process.

use std::path::{Path, PathBuf};

use anyhow::Context;
use dcs_shared::shutdown::CancellationToken;

use crate::registry::{Component, Kind, RunFuture};
use crate::stack::StackConfig;

/// The embedded broker, from the stack config's `broker:` section.
pub const BROKER: Component = Component {
    name: "broker",
    kind: Kind::Broker,
    check: |stack, _| {
        // The password files exist once `dcs up` has run; if they do, they must be usable.
        if let Some(f) = stack
            .broker
            .as_ref()
            .and_then(|b| b.auth.password_file.as_deref())
        {
            if f.exists() {
                dcs_broker::auth::PasswordFile::load(f)?;
            }
        }
        if stack
            .mqtt
            .password_file
            .as_deref()
            .is_some_and(Path::exists)
        {
            stack.mqtt.resolve_password().map_err(anyhow::Error::msg)?;
        }
        Ok(None)
    },
    run: run_broker,
};

fn run_broker(
    stack: StackConfig,
    _config: Option<PathBuf>,
    shutdown: CancellationToken,
) -> RunFuture {
    Box::pin(async move {
        let config = stack
            .broker
            .context("the stack config has no `broker:` section")?;
        // Paths in the section were made absolute when the stack config was loaded.
        let running = dcs_broker::start(&config, None::<&Path>)?;
        for (kind, addr) in &running.listeners {
            tracing::info!(listener = kind, %addr, "broker listening");
        }
        shutdown.cancelled().await;
        Ok(())
    })
}

/// Loads a component's own config file, named in the stack config.
fn load<T: serde::de::DeserializeOwned + dcs_shared::Validate>(
    name: &str,
    file: Option<&Path>,
) -> anyhow::Result<T> {
    let file =
        file.with_context(|| format!("`{name}` needs `config: FILE` in the stack config"))?;
    Ok(dcs_shared::config::load::<T>(file)?)
}

/// The Julabo chiller driver.
pub const JULABO: Component = Component {
    name: "julabo",
    kind: Kind::Service,
    check: |_, file| load::<julabo::JulaboConfig>("julabo", file).map(|c| Some(c.name)),
    run: |stack, file, shutdown| {
        Box::pin(async move {
            let cfg = load::<julabo::JulaboConfig>("julabo", file.as_deref())?;
            let mqtt = stack.mqtt_for(&cfg.name);
            julabo::service::run(cfg, mqtt, shutdown).await
        })
    },
};

/// The CAEN power-supply FSM.
pub const CAEN: Component = Component {
    name: "caen-fsm",
    kind: Kind::Service,
    check: |_, file| load::<caen::CaenConfig>("caen-fsm", file).map(|c| Some(c.name)),
    run: |stack, file, shutdown| {
        Box::pin(async move {
            let cfg = load::<caen::CaenConfig>("caen-fsm", file.as_deref())?;
            let mqtt = stack.mqtt_for(&cfg.name);
            caen::run(cfg, file, mqtt, shutdown).await
        })
    },
};

/// The CAEN mainframe simulator (EPICS CA server).
pub const CAEN_SIM: Component = Component {
    name: "caen-sim",
    kind: Kind::Simulator,
    check: |_, file| load_caen_sim(file).map(|_| None),
    run: |_, file, shutdown| {
        Box::pin(async move {
            let cfg = load_caen_sim(file.as_deref())?;
            caen_sim::run(cfg, shutdown).await
        })
    },
};

fn load_caen_sim(file: Option<&Path>) -> anyhow::Result<caen_sim::SimConfig> {
    let mut cfg = load::<caen_sim::SimConfig>("caen-sim", file)?;
    if let Some(f) = file {
        cfg.resolve_paths(f);
    }
    Ok(cfg)
}

/// The Julabo simulator.
pub const JULABO_SIM: Component = Component {
    name: "julabo-sim",
    kind: Kind::Simulator,
    check: |_, file| load::<julabo_sim::SimConfig>("julabo-sim", file).map(|_| None),
    run: |_, file, shutdown| {
        Box::pin(async move {
            let cfg = load::<julabo_sim::SimConfig>("julabo-sim", file.as_deref())?;
            julabo_sim::run(cfg, shutdown).await
        })
    },
};

/// The safety interlock.
pub const INTERLOCK: Component = Component {
    name: "interlock",
    kind: Kind::Service,
    check: |_, file| load::<interlock::InterlockConfig>("interlock", file).map(|c| Some(c.name)),
    run: |stack, file, shutdown| {
        Box::pin(async move {
            let mut cfg = load::<interlock::InterlockConfig>("interlock", file.as_deref())?;
            if let Some(f) = file.as_deref() {
                cfg.resolve_paths(f);
            }
            let mqtt = stack.mqtt_for(&cfg.name);
            interlock::service::run(cfg, mqtt, shutdown).await
        })
    },
};

/// The environmental sensor boards (MQTT publishers).
pub const ENV_SIM: Component = Component {
    name: "env-sim",
    kind: Kind::Simulator,
    check: |_, file| load::<env_sim::EnvSimConfig>("env-sim", file).map(|c| Some(c.name)),
    run: |stack, file, shutdown| {
        Box::pin(async move {
            let cfg = load::<env_sim::EnvSimConfig>("env-sim", file.as_deref())?;
            let mqtt = stack.mqtt_for(&cfg.name);
            env_sim::run(cfg, mqtt, shutdown).await
        })
    },
};

/// The MQTT to InfluxDB forwarder.
pub const TELEMETRY: Component = Component {
    name: "telemetry",
    kind: Kind::Service,
    check: |_, file| load_telemetry(file).map(|c| Some(c.name)),
    run: |stack, file, shutdown| {
        Box::pin(async move {
            let cfg = load_telemetry(file.as_deref())?;
            let mqtt = stack.mqtt_for(&cfg.name);
            telemetry::service::run(cfg, mqtt, shutdown).await
        })
    },
};

fn load_telemetry(file: Option<&Path>) -> anyhow::Result<telemetry::TelemetryConfig> {
    let mut cfg = load::<telemetry::TelemetryConfig>("telemetry", file)?;
    if let Some(f) = file {
        cfg.resolve_paths(f);
    }
    Ok(cfg)
}

/// The Ph2_ACF calibration bridge.
pub const PH2ACF: Component = Component {
    name: "ph2acf-bridge",
    kind: Kind::Service,
    check: |_, file| load_ph2acf(file).map(|c| Some(c.name)),
    run: |stack, file, shutdown| {
        Box::pin(async move {
            let cfg = load_ph2acf(file.as_deref())?;
            let mqtt = stack.mqtt_for(&cfg.name);
            ph2acf::service::run(cfg, mqtt, shutdown).await
        })
    },
};

/// Loads the bridge config with its paths resolved against the file.
pub fn load_ph2acf(file: Option<&Path>) -> anyhow::Result<ph2acf::BridgeConfig> {
    let path = file.context("ph2acf-bridge needs a config file (`config:` in the stack config)")?;
    Ok(ph2acf::BridgeConfig::load(path)?)
}

/// The simulated Ph2_ACF middleware.
pub const PH2ACF_SIM: Component = Component {
    name: "ph2acf-sim",
    kind: Kind::Simulator,
    check: |_, file| load_ph2acf_sim(file).map(|_| None),
    run: |_, file, shutdown| {
        Box::pin(async move {
            let cfg = load_ph2acf_sim(file.as_deref())?;
            ph2acf_sim::run(cfg, shutdown).await
        })
    },
};

fn load_ph2acf_sim(file: Option<&Path>) -> anyhow::Result<ph2acf_sim::SimConfig> {
    let path = file.context("ph2acf-sim needs a config file (`config:` in the stack config)")?;
    Ok(ph2acf_sim::SimConfig::load(path)?)
}
