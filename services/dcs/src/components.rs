//! The embedded broker, the one component whose config is the stack config's own
//! `broker:` section rather than a file; every other component is a
//! [`dcs_shared::program::Program`] registered in [`crate::registry`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::registry::{Component, Kind};
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

fn run_broker(stack: StackConfig, _config: Option<PathBuf>, check: bool) -> ExitCode {
    let Some(config) = stack.broker.clone() else {
        eprintln!("broker: the stack config has no `broker:` section");
        return ExitCode::from(2);
    };
    if let Err(e) = (BROKER.check)(&stack, None) {
        eprintln!("broker: {e:#}");
        return ExitCode::from(2);
    }
    if check {
        println!("broker: OK");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("broker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = dcs_shared::shutdown::on_signal();
        // Paths in the section were made absolute when the stack config was loaded.
        let running = dcs_broker::start(&config, None::<&Path>)?;
        for (kind, addr) in &running.listeners {
            tracing::info!(listener = kind, %addr, "broker listening");
        }
        shutdown.cancelled().await;
        anyhow::Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the bridge config with its paths resolved against the file (`dcs run show`).
pub fn load_ph2acf(file: Option<&Path>) -> anyhow::Result<ph2acf::BridgeConfig> {
    let path = file.context("ph2acf-bridge needs a config file (`config:` in the stack config)")?;
    Ok(dcs_shared::program::load::<ph2acf::Bridge>(path)?)
}
