//! One entry point per service and simulator, the same under its own binary and under
//! `dcs run NAME` (what `dcs up` starts): the same config loading (every relative path
//! resolved against the file that names it, the MQTT password file included), the same
//! `--check` line, the same runtime and shutdown timeout, the same exit codes: 2 for a
//! configuration error, 1 for a failure at run time.
//!
//! A program implements [`Program`] once; its `main` is [`main`] (or, with extra
//! flags of its own, [`check_or_run`]), and the launcher registers it with one line.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::config::{self, ConfigError, Validate};
use crate::mqtt::MqttSettings;
use crate::shutdown::CancellationToken;

/// A service or simulator.
pub trait Program: 'static {
    /// The binary's name, and the component's name in the stack config.
    const NAME: &'static str;
    /// What the process does, for `--help`.
    const ABOUT: &'static str;
    /// Its config file.
    type Config: DeserializeOwned + Validate + Send + 'static;
    /// One thread is enough (the work is I/O on a few sockets); most use more.
    const SINGLE_THREAD: bool = false;
    /// How long tasks still running get once [`Program::run`] has returned (a CA
    /// client's background tasks, say) before the process exits.
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

    /// Runs first, while the process has a single thread (environment set-up).
    fn before_threads() {}

    /// Makes the config's own relative paths relative to `file` (the MQTT password
    /// file is done by [`load`]).
    fn resolve_paths(_cfg: &mut Self::Config, _file: &Path) {}

    /// Loads what the config (from `file`) names in files of its own (a register map,
    /// say), once its paths are resolved; an error names the file, line and key.
    fn load_files(_cfg: &mut Self::Config, _file: &Path) -> Result<(), ConfigError> {
        Ok(())
    }

    /// The MQTT settings in the config, for programs that use MQTT.
    fn mqtt(_cfg: &mut Self::Config) -> Option<&mut MqttSettings> {
        None
    }

    /// The MQTT client id (its `name`), for programs that use MQTT: `dcs up` makes an
    /// account of that name.
    fn client_id(_cfg: &Self::Config) -> Option<String> {
        None
    }

    /// What `--check` says after `NAME: FILE OK`, e.g. `(3 channels)`.
    fn summary(_cfg: &Self::Config) -> String {
        String::new()
    }

    /// Runs until `shutdown` is cancelled. `file` is the config file (for reloads);
    /// `mqtt` the broker settings: the file's with the environment's overrides when
    /// run alone, the stack's account when run by `dcs up`.
    fn run(
        cfg: Self::Config,
        file: PathBuf,
        mqtt: MqttSettings,
        shutdown: CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Loads `file`: parsed, checked, every relative path resolved against the file.
pub fn load<P: Program>(file: &Path) -> Result<P::Config, ConfigError> {
    let mut cfg: P::Config = config::load(file)?;
    P::resolve_paths(&mut cfg, file);
    if let Some(m) = P::mqtt(&mut cfg) {
        if let Some(p) = m.password_file.take() {
            m.password_file = Some(config::relative_to(file, &p));
        }
    }
    P::load_files(&mut cfg, file)?;
    Ok(cfg)
}

/// The line `--check` prints.
pub fn check_line<P: Program>(file: &Path, cfg: &P::Config) -> String {
    let summary = P::summary(cfg);
    let mut line = format!("{}: {} OK", P::NAME, file.display());
    if !summary.is_empty() {
        line.push(' ');
        line.push_str(&summary);
    }
    line
}

/// Runs `P` on a runtime of its own until SIGTERM or SIGINT. Exit code 0, or 1 with
/// the error on stderr.
pub fn execute<P: Program>(cfg: P::Config, file: PathBuf, mqtt: MqttSettings) -> ExitCode {
    let built = if P::SINGLE_THREAD {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: cannot start the async runtime: {e}", P::NAME);
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = crate::shutdown::on_signal();
        P::run(cfg, file, mqtt, shutdown).await
    });
    runtime.shutdown_timeout(P::SHUTDOWN_TIMEOUT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e:#}", P::NAME);
            ExitCode::FAILURE
        }
    }
}

/// Loads `file`, applies `adjust` (command-line overrides), then [`finish`]es. The
/// tail of the `main` of a binary with flags of its own.
pub fn check_or_run<P: Program>(
    file: &Path,
    check: bool,
    adjust: impl FnOnce(&mut P::Config),
) -> ExitCode {
    let mut cfg = match load::<P>(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", P::NAME);
            return ExitCode::from(2);
        }
    };
    adjust(&mut cfg);
    finish::<P>(cfg, Some(file), check)
}

/// Checks `cfg` (from `file`, or from the command line alone), then prints the check
/// line (`check`) or runs `P` with the config's MQTT settings and the environment's
/// overrides.
pub fn finish<P: Program>(mut cfg: P::Config, file: Option<&Path>, check: bool) -> ExitCode {
    if let Err((k, m)) = cfg.validate() {
        eprintln!("{}: `{k}`: {m}", P::NAME);
        return ExitCode::from(2);
    }
    if check {
        let shown = file.unwrap_or(Path::new("(command line)"));
        println!("{}", check_line::<P>(shown, &cfg));
        return ExitCode::SUCCESS;
    }
    let mqtt = P::mqtt(&mut cfg)
        .map(|m| m.clone().with_env_overrides())
        .unwrap_or_default();
    execute::<P>(cfg, file.map(Path::to_path_buf).unwrap_or_default(), mqtt)
}

/// The whole `main` of a program whose only arguments are `--config FILE [--check]`.
pub fn main<P: Program>() -> ExitCode {
    P::before_threads();
    crate::logging::init("info");
    let m = clap::Command::new(P::NAME)
        .about(P::ABOUT)
        .version(env!("CARGO_PKG_VERSION"))
        .arg(
            clap::Arg::new("config")
                .long("config")
                .short('c')
                .value_name("FILE")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("The YAML config"),
        )
        .arg(
            clap::Arg::new("check")
                .long("check")
                .action(clap::ArgAction::SetTrue)
                .help("Check the config and exit"),
        )
        .get_matches();
    let Some(file) = m.get_one::<PathBuf>("config") else {
        return ExitCode::from(2);
    };
    check_or_run::<P>(file, m.get_flag("check"), |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Cfg {
        name: String,
        dir: PathBuf,
        #[serde(default)]
        mqtt: MqttSettings,
    }

    impl Validate for Cfg {
        fn validate(&self) -> Result<(), (String, String)> {
            if self.name.is_empty() {
                return Err(("name".into(), "must not be empty".into()));
            }
            Ok(())
        }
    }

    struct Demo;

    impl Program for Demo {
        const NAME: &'static str = "demo";
        const ABOUT: &'static str = "A demo.";
        type Config = Cfg;
        fn resolve_paths(cfg: &mut Cfg, file: &Path) {
            cfg.dir = config::relative_to(file, &cfg.dir);
        }
        fn mqtt(cfg: &mut Cfg) -> Option<&mut MqttSettings> {
            Some(&mut cfg.mqtt)
        }
        fn summary(cfg: &Cfg) -> String {
            format!("({})", cfg.name)
        }
        async fn run(
            _: Cfg,
            _: PathBuf,
            _: MqttSettings,
            _: CancellationToken,
        ) -> anyhow::Result<()> {
            anyhow::bail!("nothing to do")
        }
    }

    #[test]
    fn every_relative_path_is_resolved_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("demo.yaml");
        std::fs::write(
            &file,
            "name: x\ndir: data\nmqtt: {password_file: secrets/mqtt}\n",
        )
        .unwrap();
        let mut cfg = load::<Demo>(&file).unwrap();
        assert_eq!(cfg.dir, dir.path().join("data"));
        assert_eq!(
            Demo::mqtt(&mut cfg).unwrap().password_file,
            Some(dir.path().join("secrets/mqtt"))
        );
        assert_eq!(
            check_line::<Demo>(&file, &cfg),
            format!("demo: {} OK (x)", file.display())
        );
    }

    #[test]
    fn exit_codes_say_config_or_run_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("demo.yaml");
        std::fs::write(&file, "name: ''\ndir: d\n").unwrap();
        assert_eq!(check_or_run::<Demo>(&file, true, |_| {}), ExitCode::from(2));
        std::fs::write(&file, "name: x\ndir: d\n").unwrap();
        assert_eq!(check_or_run::<Demo>(&file, true, |_| {}), ExitCode::SUCCESS);
        assert_eq!(
            check_or_run::<Demo>(&file, false, |_| {}),
            ExitCode::FAILURE
        );
        // A command-line override is checked like the file.
        assert_eq!(
            check_or_run::<Demo>(&file, true, |c| c.name.clear()),
            ExitCode::from(2)
        );
    }
}
