//! `dcs-broker [--config FILE]`: run the embedded MQTT broker until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dcs_broker::BrokerConfig;

/// Embedded MQTT broker of the Tracker DCS suite (rumqttd).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Broker config (YAML). Without it: loopback listeners 1883 (MQTT 3.1.1), 1884
    /// (MQTT 5), 8083 (websocket), and a password file must be given with --passwd.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Mosquitto password file, overriding `auth.password_file`.
    #[arg(long)]
    passwd: Option<PathBuf>,
    /// Check the config and exit.
    #[arg(long)]
    check: bool,
    /// Print a password-file line (`USER:$7$...`, as `mosquitto_passwd` writes) for the
    /// password read from the first line of standard input, and exit.
    #[arg(long, value_name = "USER", conflicts_with_all = ["config", "passwd", "check"])]
    hash_user: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let args = Args::parse();
    if let Some(user) = &args.hash_user {
        return hash_user(user);
    }
    let mut config = match &args.config {
        Some(path) => match dcs_shared::config::load::<BrokerConfig>(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("dcs-broker: {e}");
                return ExitCode::from(2);
            }
        },
        None => BrokerConfig::default(),
    };
    if let Some(p) = args.passwd {
        // Relative to the working directory, as a command-line path should be.
        config.auth.password_file = Some(std::path::absolute(&p).unwrap_or(p));
    }
    if let Err((key, msg)) = dcs_shared::Validate::validate(&config) {
        eprintln!(
            "dcs-broker: {}: key `{key}`: {msg}",
            args.config
                .as_deref()
                .unwrap_or("(defaults)".as_ref())
                .display()
        );
        return ExitCode::from(2);
    }
    if args.check {
        println!("config OK");
        return ExitCode::SUCCESS;
    }
    let mut signals = dcs_shared::shutdown::Signals::install();
    match dcs_broker::start(&config, args.config.as_deref()) {
        Ok(running) => {
            for (kind, addr) in &running.listeners {
                println!("dcs-broker: {kind} listening on {addr}");
            }
        }
        Err(e) => {
            eprintln!("dcs-broker: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let signal = signals.recv().await;
    tracing::info!(signal, "stopping broker");
    ExitCode::SUCCESS
}

fn hash_user(user: &str) -> ExitCode {
    if user.is_empty() || user.contains(':') {
        eprintln!("dcs-broker: a user name is not empty and has no `:`");
        return ExitCode::from(2);
    }
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("dcs-broker: cannot read the password from standard input: {e}");
        return ExitCode::from(2);
    }
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        eprintln!("dcs-broker: empty password on standard input");
        return ExitCode::from(2);
    }
    println!("{}", dcs_broker::auth::hash_entry(user, password));
    ExitCode::SUCCESS
}
