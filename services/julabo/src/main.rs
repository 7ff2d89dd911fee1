//! `julabo --config FILE`: the MQTT service.
//! `julabo --port P --status | --read-int | --read-sp | --read-pow | --sp N --read-wt |
//! --sp N --set-wt T | --sp N --use-sp | --start | --stop`: one-shot bench commands,
//! as the lab's Python script had.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use julabo::config::SerialSettings;
use julabo::protocol::{Query, Write};
use julabo::transport::{self, Endpoint, Link, LinkError};

/// Julabo chiller driver.
#[derive(Parser)]
#[command(version, group(ArgGroup::new("action").args(["status", "read_int", "read_sp", "read_pow", "read_wt", "set_wt", "use_sp", "start", "stop"])))]
struct Args {
    /// Service mode: YAML config.
    #[arg(long, short, conflicts_with = "port")]
    config: Option<PathBuf>,
    /// Service mode: check the config and exit.
    #[arg(long, requires = "config")]
    check: bool,
    /// One-shot mode: `/dev/ttyUSB0` or `tcp://host:port`.
    #[arg(long, requires = "action")]
    port: Option<String>,
    /// Print STATUS.
    #[arg(long)]
    status: bool,
    /// Print the bath (internal) temperature.
    #[arg(long)]
    read_int: bool,
    /// Print the active set-point and its temperature.
    #[arg(long)]
    read_sp: bool,
    /// Print the heating/cooling power.
    #[arg(long)]
    read_pow: bool,
    /// Print set-point --sp N.
    #[arg(long, requires = "sp")]
    read_wt: bool,
    /// Set set-point --sp N to T degC.
    #[arg(long, requires = "sp", allow_negative_numbers = true, value_name = "T")]
    set_wt: Option<f64>,
    /// Make --sp N the active set-point.
    #[arg(long, requires = "sp")]
    use_sp: bool,
    /// Start circulating.
    #[arg(long)]
    start: bool,
    /// Stop circulating.
    #[arg(long)]
    stop: bool,
    /// Set-point number, 1..3.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
    sp: Option<u8>,
    /// Baud rate (serial).
    #[arg(long, default_value_t = 4800)]
    baud: u32,
    /// Data bits, 7 or 8 (serial).
    #[arg(long, default_value_t = 7)]
    data_bits: u8,
    /// none, even or odd (serial).
    #[arg(long, default_value = "even")]
    parity: String,
    /// rtscts, xonxoff or none (serial).
    #[arg(long, default_value = "rtscts")]
    flow_control: String,
    /// Which of IN_PV_01/02 is the power on this model.
    #[arg(long, default_value_t = 1)]
    power_pv: u8,
    /// Lowest set-point --set-wt accepts.
    #[arg(long, default_value_t = -50.0, allow_negative_numbers = true)]
    temp_min: f64,
    /// Highest set-point --set-wt accepts.
    #[arg(long, default_value_t = 50.0, allow_negative_numbers = true)]
    temp_max: f64,
}

fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let args = Args::parse();
    if let Some(path) = &args.config {
        return dcs_shared::program::check_or_run::<julabo::Julabo>(path, args.check, |_| {});
    }
    let Some(port) = args.port.clone() else {
        eprintln!("julabo: give --config FILE (service) or --port P with an action (see --help)");
        return ExitCode::from(2);
    };
    let Some(action) = Action::of(&args) else {
        eprintln!("julabo: give one action with --port (see --help)");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("julabo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(one_shot(&args, action, &port)) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("julabo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The one-shot action asked for (clap's `action` group allows at most one).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Status,
    ReadInt,
    ReadSp,
    ReadPow,
    ReadWt,
    SetWt(f64),
    UseSp,
    Start,
    Stop,
}

impl Action {
    fn of(a: &Args) -> Option<Action> {
        let flags = [
            (a.status, Action::Status),
            (a.read_int, Action::ReadInt),
            (a.read_sp, Action::ReadSp),
            (a.read_pow, Action::ReadPow),
            (a.read_wt, Action::ReadWt),
            (a.use_sp, Action::UseSp),
            (a.start, Action::Start),
            (a.stop, Action::Stop),
        ];
        a.set_wt
            .map(Action::SetWt)
            .or_else(|| flags.into_iter().find(|f| f.0).map(|f| f.1))
    }
}

async fn one_shot(a: &Args, action: Action, port: &str) -> Result<String, String> {
    if let Action::SetWt(t) = action {
        if !(a.temp_min..=a.temp_max).contains(&t) {
            return Err(format!(
                "{} is outside the limits {} .. {} degC",
                dcs_shared::command::show_number(t),
                a.temp_min,
                a.temp_max
            ));
        }
    }
    let endpoint = Endpoint::parse(port)?;
    let serial = SerialSettings {
        baud: a.baud,
        data_bits: a.data_bits,
        parity: a.parity.clone(),
        stop_bits: 1,
        flow_control: a.flow_control.clone(),
    };
    let p = transport::open(&endpoint, &serial, Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    let mut link =
        Link::new(p, Duration::from_millis(260), Duration::from_secs(1)).with_line_speed(&serial);
    // The first query after opening may time out on a real unit: one retry.
    if let Err(LinkError::Timeout(..)) = link.query(Query::Version).await {
        link.query(Query::Version)
            .await
            .map_err(|e| e.to_string())?;
    }
    let sp = a.sp.unwrap_or(1) - 1;
    let e = |e: LinkError| e.to_string();
    let write = match action {
        Action::Status => return Ok(link.status().await.map_err(e)?.to_string()),
        Action::ReadInt => {
            return Ok(format!(
                "{:.2}",
                link.float(Query::BathTemp).await.map_err(e)?
            ))
        }
        Action::ReadPow => {
            let q = if a.power_pv == 2 {
                Query::Pv2
            } else {
                Query::Pv1
            };
            return Ok(format!("{:.1}", link.float(q).await.map_err(e)?));
        }
        Action::ReadSp => {
            let n = link.int(Query::ActiveSetpoint).await.map_err(e)?;
            let n = u8::try_from(n)
                .ok()
                .filter(|n| *n <= 2)
                .ok_or(format!("the chiller reports active set-point {n}"))?;
            let t = link.float(Query::Setpoint(n)).await.map_err(e)?;
            return Ok(format!("setpoint {}: {t:.2}", n + 1));
        }
        Action::ReadWt => {
            return Ok(format!(
                "{:.2}",
                link.float(Query::Setpoint(sp)).await.map_err(e)?
            ))
        }
        Action::SetWt(t) => Write::Setpoint(sp, t),
        Action::UseSp => Write::ActiveSetpoint(sp),
        Action::Start => Write::Run(true),
        Action::Stop => Write::Run(false),
    };
    link.write(write).await.map_err(e)?;
    Ok(format!("ok: {}", write.text()))
}
