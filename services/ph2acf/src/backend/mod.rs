//! The two ways of driving Ph2_ACF: the MiddlewareController over TCP
//! ([`middleware`]) and the command-line tool ([`cli`]). Both report [`RunEvent`]s as
//! the run goes and end with an [`Outcome`]; timeouts, crashes and dropped
//! connections end it as failed with the reason.

pub mod cli;
pub mod middleware;

use std::time::Duration;

use dcs_shared::shutdown::CancellationToken;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::commands::RunPlan;
use crate::config::{BackendKind, BridgeConfig};

/// Something learnt during a run.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// Ph2_ACF's run number.
    RunNumber(u64),
    /// Progress, percent.
    Progress(f64),
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still going (only in the start record).
    Running,
    /// Finished normally.
    Done,
    /// Ended by `ph2acf/cmd/stop`.
    Stopped,
    /// Ended by an error (the reason is recorded).
    Failed,
}

impl RunStatus {
    /// The word used in documents, points and status.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Done => "done",
            RunStatus::Stopped => "stopped",
            RunStatus::Failed => "failed",
        }
    }
}

/// The end of a run as the backend saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Done, stopped or failed.
    pub status: RunStatus,
    /// Why it failed.
    pub error: Option<String>,
}

impl Outcome {
    pub(crate) fn done() -> Self {
        Outcome {
            status: RunStatus::Done,
            error: None,
        }
    }
    pub(crate) fn stopped() -> Self {
        Outcome {
            status: RunStatus::Stopped,
            error: None,
        }
    }
    pub(crate) fn failed(why: impl Into<String>) -> Self {
        Outcome {
            status: RunStatus::Failed,
            error: Some(why.into()),
        }
    }
}

/// Limits every backend applies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Whole run.
    pub run: Duration,
    /// Silence (no output line, no status answer).
    pub stall: Duration,
}

/// Runs `plan` with the configured backend until it ends or `stop` is cancelled.
pub async fn execute(
    cfg: &BridgeConfig,
    plan: &RunPlan,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: CancellationToken,
) -> Outcome {
    let limits = Limits {
        run: Duration::from_secs_f64(cfg.run_timeout_secs),
        stall: Duration::from_secs_f64(cfg.stall_timeout_secs),
    };
    match (cfg.backend, &cfg.middleware, &cfg.cli) {
        (BackendKind::Middleware, Some(m), _) => {
            middleware::execute(m, &cfg.work_dir, plan, limits, events, stop).await
        }
        (BackendKind::Cli, _, Some(c)) => {
            cli::execute(c, &cfg.work_dir, plan, limits, events, stop).await
        }
        _ => Outcome::failed("backend not configured"),
    }
}
