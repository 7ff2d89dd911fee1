//! `dcs`: the launcher of the Tracker DCS suite.
//!
//! - `dcs up [--config FILE] [--simulate]` runs the broker, the services and (with
//!   `--simulate`) the hardware simulators, each as a supervised child process;
//! - `dcs check --config FILE` validates a stack config and every file it names;
//! - `dcs run NAME --config FILE` runs one component in this process (what `dcs up`
//!   starts for each child);
//! - `dcs alarms log [--since 12h] [--rule RULE]` prints the alarm journal;
//! - `dcs burnin show RUN_ID [--json] [--csv DIR]` prints a burn-in run.

mod components;
mod launcher;
mod registry;
mod stack;
mod supervisor;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dcs_shared::shutdown::CancellationToken;
use stack::StackConfig;
use supervisor::{ChildSpec, StatusBoard};

/// Tracker DCS launcher.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole stack until Ctrl-C or SIGTERM.
    Up {
        /// Stack config.
        #[arg(long, short, default_value = "deploy/dcs.yaml")]
        config: PathBuf,
        /// Also run the hardware simulators listed under `simulators:`.
        #[arg(long)]
        simulate: bool,
    },
    /// Validate a stack config and every config file it names.
    Check {
        /// Stack config.
        #[arg(long, short, default_value = "deploy/dcs.yaml")]
        config: PathBuf,
    },
    /// Run one component in this process (used by `dcs up`), or `dcs run show RUN_ID`.
    #[command(args_conflicts_with_subcommands = true)]
    Run {
        #[command(subcommand)]
        runs: Option<Runs>,
        /// Component name (`broker`, or a name under `services:`/`simulators:`).
        name: Option<String>,
        /// Stack config.
        #[arg(long, short, default_value = "deploy/dcs.yaml")]
        config: PathBuf,
        /// Check the component's config and exit, as its own binary's `--check`.
        #[arg(long)]
        check: bool,
    },
    /// The alarm journal (kept by the notifier).
    Alarms {
        #[command(subcommand)]
        what: Alarms,
    },
    /// Burn-in runs (kept by `burnin`).
    Burnin {
        #[command(subcommand)]
        what: Burnin,
    },
}

#[derive(Subcommand)]
enum Burnin {
    /// A run's timeline, pauses and IV tables.
    Show {
        /// The run id (`burnin/status` `run_id`).
        run_id: String,
        /// Print the run document as JSON instead.
        #[arg(long)]
        json: bool,
        /// Also write each IV curve as CSV (one file per channel and scan) into DIR.
        #[arg(long, value_name = "DIR")]
        csv: Option<PathBuf>,
        /// Stack config (the `burnin` service's file says where runs are kept).
        #[arg(long, short, default_value = "deploy/dcs.yaml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum Alarms {
    /// Every alarm event, acknowledgement, shelve and notification, oldest first.
    Log {
        /// From: `30m`, `12h`, `7d` ago, or an RFC 3339 instant.
        #[arg(long)]
        since: Option<String>,
        /// Only this rule (or service, for the watchdog's entries).
        #[arg(long)]
        rule: Option<String>,
        /// At most this many (the latest); 0: all.
        #[arg(long, default_value_t = 200)]
        limit: usize,
        /// One JSON entry per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Stack config (the `notifier` service's file says where the journal is).
        #[arg(long, short, default_value = "deploy/dcs.yaml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum Runs {
    /// A calibration run from MongoDB with the environment during it from InfluxDB.
    Show {
        /// The run id (`ph2acf/status`, `ph2acf/run` markers, the run document).
        run_id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Stack config (the `ph2acf-bridge` service's file says where the databases are).
        #[arg(long, short, default_value = "deploy/dcs.yaml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let cli = Cli::parse();
    if let Cmd::Run {
        name: Some(name),
        config,
        check,
        runs: None,
    } = &cli.command
    {
        // The component's own runtime and exit codes: nothing of the launcher's runs
        // first (the component may have to set up its environment while the process
        // is still single-threaded).
        return run(name, config, *check);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dcs: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Exit codes: 2 for a configuration error (checked first), 1 for a failure at run
    // time, as every component.
    let config_error = |e: anyhow::Error| {
        eprintln!("dcs: {e:#}");
        ExitCode::from(2)
    };
    let run_time = |r: anyhow::Result<()>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dcs: {e:#}");
            ExitCode::FAILURE
        }
    };
    match cli.command {
        Cmd::Up { config, simulate } => match check(&config) {
            Err(e) => config_error(e),
            Ok(_) => run_time(runtime.block_on(up(&config, simulate))),
        },
        Cmd::Check { config } => match check(&config) {
            Err(e) => config_error(e),
            Ok((summary, _)) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
        },
        Cmd::Run {
            runs:
                Some(Runs::Show {
                    run_id,
                    json,
                    config,
                }),
            ..
        } => match show_config(&config) {
            Err(e) => config_error(e),
            Ok(cfg) => run_time(runtime.block_on(show_run(&cfg, &run_id, json))),
        },
        Cmd::Alarms {
            what:
                Alarms::Log {
                    since,
                    rule,
                    limit,
                    json,
                    config,
                },
        } => {
            let query = since
                .as_deref()
                .map(|s| notifier::journal::parse_since(s, dcs_shared::UtcNanos::now().as_nanos()))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--since {e}"))
                .map(|since_ns| notifier::journal::Query {
                    since_ns,
                    rule,
                    limit,
                });
            match query.and_then(|q| notifier_config(&config).map(|c| (c, q))) {
                Err(e) => config_error(e),
                Ok((cfg, q)) => run_time(runtime.block_on(alarms_log(&cfg, &q, json))),
            }
        }
        Cmd::Burnin {
            what:
                Burnin::Show {
                    run_id,
                    json,
                    csv,
                    config,
                },
        } => match service_config::<burnin::Burnin>(&config) {
            Err(e) => config_error(e),
            Ok(cfg) => run_time(runtime.block_on(burnin_show(&cfg, &run_id, json, csv.as_deref()))),
        },
        Cmd::Run { .. } => config_error(anyhow::anyhow!(
            "give a component name (`dcs run NAME`) or `dcs run show RUN_ID`"
        )),
    }
}

/// Loads the stack and checks every enabled component's config; returns a summary and
/// the MQTT client ids the components connect with.
fn check(path: &Path) -> anyhow::Result<(String, Vec<String>)> {
    let stack = StackConfig::load(path)?;
    let mut names = Vec::new();
    let mut ids = Vec::new();
    for (component, file) in stack.enabled(true) {
        let id = (component.check)(&stack, file.as_deref()).map_err(|e| {
            anyhow::anyhow!("{} `{}`: {e:#}", component.kind.noun(), component.name)
        })?;
        names.push(component.name);
        ids.extend(id);
    }
    Ok((
        format!("{}: OK ({})", path.display(), names.join(", ")),
        ids,
    ))
}

async fn up(path: &Path, simulate: bool) -> anyhow::Result<()> {
    let (summary, client_ids) = check(path)?;
    let stack = StackConfig::load(path)?;
    let stack_path = std::path::absolute(path)?;
    tracing::info!("{summary}");
    for said in stack::ensure_service_accounts(&stack, &client_ids)? {
        println!("dcs: {said}");
    }
    let mut signals = dcs_shared::shutdown::Signals::install();
    let exe = std::env::current_exe()?;
    let board = StatusBoard::default();
    let broker_stop = CancellationToken::new();
    let services_stop = CancellationToken::new();
    // Simulators stop after the services: a driver must not see its hardware vanish
    // (and warn about it) in a clean stop.
    let simulators_stop = CancellationToken::new();
    let mut broker_task = None;
    let mut service_tasks = Vec::new();
    let mut simulator_tasks = Vec::new();
    let mut restarts = HashMap::new();

    for (component, _) in stack.enabled(simulate) {
        let spec = ChildSpec {
            name: component.name.to_string(),
            program: exe.clone(),
            args: vec![
                "run".into(),
                component.name.into(),
                "--config".into(),
                stack_path.display().to_string(),
            ],
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        restarts.insert(component.name.to_string(), tx);
        if component.kind == registry::Kind::Broker {
            let token = broker_stop.clone();
            broker_task = Some(tokio::spawn(supervisor::supervise(
                spec,
                board.clone(),
                token,
                rx,
            )));
            if let Some(b) = &stack.broker {
                for (kind, addr) in b.listeners.all() {
                    let scheme = if kind == "websocket" { "ws" } else { "mqtt" };
                    println!("dcs: broker {kind:<9} {scheme}://{addr}");
                }
                // Services retry anyway; waiting here keeps the first minute's logs clean.
                if let Some(addr) = b.listeners.mqtt.or(b.listeners.mqtt5) {
                    wait_listening(addr, Duration::from_secs(15)).await;
                }
            }
        } else {
            let (stop, tasks) = if component.kind == registry::Kind::Simulator {
                (&simulators_stop, &mut simulator_tasks)
            } else {
                (&services_stop, &mut service_tasks)
            };
            tasks.push(tokio::spawn(supervisor::supervise(
                spec,
                board.clone(),
                stop.clone(),
                rx,
            )));
            println!(
                "dcs: {} `{}` started",
                component.kind.noun(),
                component.name
            );
        }
    }
    if simulate && !stack.simulators.values().any(|e| e.enabled) {
        println!("dcs: --simulate: no simulator is enabled under `simulators:`");
    }
    if stack.broker.is_none() {
        println!("dcs: using the external broker at {}", stack.mqtt.url);
    }
    let launcher_stop = CancellationToken::new();
    let launcher = tokio::spawn(launcher::run(
        stack.mqtt.clone(),
        board.clone(),
        restarts,
        launcher_stop.clone(),
    ));
    println!(
        "dcs: up; status on MQTT `{}/status`; Ctrl-C stops everything",
        launcher::NAME
    );

    let signal = signals.recv().await;
    tracing::info!(signal, "stopping the stack (a second Ctrl-C exits at once)");
    let first = std::time::Instant::now();
    tokio::spawn(async move {
        loop {
            let again = signals.recv().await;
            // One signal often arrives twice (sent to the process and to its group, as
            // `timeout` and group-wide kills do): only a later one is a second request.
            if first.elapsed() < Duration::from_secs(1) {
                continue;
            }
            // Children get SIGTERM from the kernel when we go (PR_SET_PDEATHSIG).
            eprintln!("dcs: {again} again: exiting without waiting for the components");
            std::process::exit(130);
        }
    });
    services_stop.cancel();
    for t in service_tasks {
        let _ = t.await;
    }
    simulators_stop.cancel();
    for t in simulator_tasks {
        let _ = t.await;
    }
    launcher_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(3), launcher).await;
    broker_stop.cancel();
    if let Some(t) = broker_task {
        let _ = t.await;
    }
    println!("dcs: stopped");
    Ok(())
}

async fn wait_listening(addr: SocketAddr, within: Duration) {
    let probe = tokio::task::spawn_blocking(move || dcs_broker::server::wait_bound(addr, within));
    if !matches!(probe.await, Ok(Ok(()))) {
        tracing::warn!(%addr, "broker not listening yet; services will keep retrying");
    }
}

/// `dcs run NAME`: the component's own entry point, with the stack's MQTT account.
fn run(name: &str, path: &Path, check: bool) -> ExitCode {
    // `dcs up` sets PR_SET_PDEATHSIG before exec, so children die with the launcher.
    let stack = match StackConfig::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dcs: {e:#}");
            return ExitCode::from(2);
        }
    };
    let Some((component, file)) = stack
        .enabled(true)
        .into_iter()
        .find(|(c, _)| c.name == name)
    else {
        eprintln!("dcs: `{name}` is not enabled in {}", path.display());
        return ExitCode::from(2);
    };
    (component.run)(stack, file, check)
}

/// The bridge config `dcs run show` reads the databases from.
fn show_config(path: &Path) -> anyhow::Result<ph2acf::BridgeConfig> {
    let stack = StackConfig::load(path)?;
    let file = stack
        .enabled(false)
        .into_iter()
        .find(|(c, _)| c.name == "ph2acf-bridge")
        .and_then(|(_, f)| f)
        .ok_or_else(|| anyhow::anyhow!("no `ph2acf-bridge` service in {}", path.display()))?;
    components::load_ph2acf(Some(&file))
}

/// `dcs run show`: the run and its environment, as a table or JSON.
async fn show_run(cfg: &ph2acf::BridgeConfig, run_id: &str, json: bool) -> anyhow::Result<()> {
    let view = ph2acf::show::fetch(cfg, run_id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", ph2acf::show::render_table(&view));
    }
    Ok(())
}

/// The config of service `P` in the stack config at `path`.
fn service_config<P: dcs_shared::program::Program>(path: &Path) -> anyhow::Result<P::Config> {
    let stack = StackConfig::load(path)?;
    let file = stack
        .enabled(false)
        .into_iter()
        .find(|(c, _)| c.name == P::NAME)
        .and_then(|(_, f)| f)
        .ok_or_else(|| anyhow::anyhow!("no `{}` service in {}", P::NAME, path.display()))?;
    Ok(dcs_shared::program::load::<P>(&file)?)
}

/// `dcs burnin show`: the run as a table or JSON, and its IV curves as CSV.
async fn burnin_show(
    cfg: &burnin::BurninConfig,
    run_id: &str,
    json: bool,
    csv: Option<&Path>,
) -> anyhow::Result<()> {
    let (doc, from) = burnin::show::fetch(cfg, run_id).await?;
    eprintln!("dcs: run {run_id} from {from}");
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", burnin::show::render(&doc));
    }
    if let Some(dir) = csv {
        for f in burnin::show::export_csv(&doc, dir)
            .map_err(|e| anyhow::anyhow!("cannot write CSV into {}: {e}", dir.display()))?
        {
            eprintln!("dcs: wrote {}", f.display());
        }
    }
    Ok(())
}

/// The notifier config `dcs alarms log` reads the journal's place from.
fn notifier_config(path: &Path) -> anyhow::Result<notifier::NotifierConfig> {
    let stack = StackConfig::load(path)?;
    let file = stack
        .enabled(false)
        .into_iter()
        .find(|(c, _)| c.name == "notifier")
        .and_then(|(_, f)| f)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no `notifier` service in {}: no alarm journal",
                path.display()
            )
        })?;
    Ok(dcs_shared::program::load::<notifier::Notifier>(&file)?)
}

/// `dcs alarms log`: from MongoDB when the notifier writes there, else its file.
async fn alarms_log(
    cfg: &notifier::NotifierConfig,
    q: &notifier::journal::Query,
    json: bool,
) -> anyhow::Result<()> {
    use notifier::journal;
    let entries = match cfg.journal.uri() {
        Some(uri) => {
            eprintln!(
                "dcs: alarm journal from MongoDB ({}.{})",
                cfg.journal.database, cfg.journal.collection
            );
            let store = journal::MongoJournal::new(&cfg.journal, &uri)
                .await
                .map_err(anyhow::Error::msg)?;
            store.query(q).await.map_err(anyhow::Error::msg)?
        }
        None => {
            let path = cfg.state_dir.join(&cfg.journal.file);
            eprintln!("dcs: alarm journal from {}", path.display());
            match journal::read_file(&path, q) {
                Ok((entries, torn)) => {
                    if torn > 0 {
                        eprintln!(
                            "dcs: {torn} unreadable line(s) skipped in {}",
                            path.display()
                        );
                    }
                    entries
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!(
                        "dcs: no alarm journal yet ({} does not exist)",
                        path.display()
                    );
                    Vec::new()
                }
                Err(e) => anyhow::bail!("cannot read the alarm journal {}: {e}", path.display()),
            }
        }
    };
    for e in &entries {
        if json {
            println!("{}", serde_json::to_string(e)?);
        } else {
            println!("{}", journal::render_line(e));
        }
    }
    Ok(())
}
