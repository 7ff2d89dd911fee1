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
    check: |_, _| Ok(()),
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
