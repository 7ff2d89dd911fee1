//! `julabo --config FILE`: the MQTT service.
//! `julabo --port P --status | --read-int | --read-sp | --read-pow | --sp N --read-wt |
//! --sp N --set-wt T | --sp N --use-sp | --start | --stop`: one-shot bench commands,
//! as the lab's Python script had.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use julabo::config::{JulaboConfig, SerialSettings};
use julabo::protocol::{Query, Write};
use julabo::transport::{self, Endpoint, Link, LinkError};

/// Julabo chiller driver.
#[derive(Parser)]
#[command(version, group(ArgGroup::new("action").args(["status", "read_int", "read_sp", "read_pow", "read_wt", "set_wt", "use_sp", "start", "stop"])))]
struct Args {
    /// Service mode: YAML config.
    #[arg(long, short, conflicts_with = "port")]
    config: Option<PathBuf>,
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

#[tokio::main]
async fn main() -> ExitCode {
    dcs_shared::logging::init("info");
    let args = Args::parse();
    if let Some(path) = &args.config {
        let cfg = match dcs_shared::config::load::<JulaboConfig>(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("julabo: {e}");
                return ExitCode::from(2);
            }
        };
        let mqtt = cfg.mqtt.clone().with_env_overrides();
        let shutdown = dcs_shared::shutdown::on_signal();
        return match julabo::service::run(cfg, mqtt, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("julabo: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(port) = args.port.clone() else {
        eprintln!("julabo: give --config FILE (service) or --port P with an action (see --help)");
        return ExitCode::from(2);
    };
    match one_shot(&args, &port).await {
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

async fn one_shot(a: &Args, port: &str) -> Result<String, String> {
    if let Some(t) = a.set_wt {
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
    Ok(if a.status {
        link.status().await.map_err(e)?.to_string()
    } else if a.read_int {
        format!("{:.2}", link.float(Query::BathTemp).await.map_err(e)?)
    } else if a.read_pow {
        let q = if a.power_pv == 2 {
            Query::Pv2
        } else {
            Query::Pv1
        };
        format!("{:.1}", link.float(q).await.map_err(e)?)
    } else if a.read_sp {
        let n = link.int(Query::ActiveSetpoint).await.map_err(e)?;
        let n = u8::try_from(n)
            .ok()
            .filter(|n| *n <= 2)
            .ok_or(format!("the chiller reports active set-point {n}"))?;
        let t = link.float(Query::Setpoint(n)).await.map_err(e)?;
        format!("setpoint {}: {t:.2}", n + 1)
    } else if a.read_wt {
        format!("{:.2}", link.float(Query::Setpoint(sp)).await.map_err(e)?)
    } else {
        let w = if let Some(t) = a.set_wt {
            Write::Setpoint(sp, t)
        } else if a.use_sp {
            Write::ActiveSetpoint(sp)
        } else if a.start {
            Write::Run(true)
        } else {
            Write::Run(false)
        };
        link.write(w).await.map_err(e)?;
        format!("ok: {}", w.text())
    })
}
