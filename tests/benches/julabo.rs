//! Julabo status cycle: the nine queries behind `julabo/status`, against the simulator
//! enforcing the real unit's 250 ms spacing, compared with the Python driver's fixed
//! sleeps (250 ms before every write, 100 ms before every read: about 3.1 s a cycle).
//! Also probes which spacing the unit tolerates, to show where the pacing comes from.
//!
//! `cargo build --release -p julabo-sim && cargo bench -p dcs-integration-tests --bench julabo`

use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use dcs_integration_tests::{bin, free_port, spawn_until};
use julabo::chiller::read_all;
use julabo::config::SerialSettings;
use julabo::transport::{open, Endpoint, Link};

fn dropped(control: u16) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", control)).unwrap();
    s.write_all(b"state\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["dropped"].as_u64().unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (port, control) = (free_port(), free_port());
    let mut cmd = Command::new(bin("julabo-sim"));
    cmd.args([
        "--tcp",
        &format!("127.0.0.1:{port}"),
        "--control",
        &format!("127.0.0.1:{control}"),
    ]);
    let _sim = spawn_until(cmd, "julabo-sim: control on", Duration::from_secs(15));
    let ep = Endpoint::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
    let serial = SerialSettings::default();

    println!("julabo status cycle (9 queries) over TCP against julabo-sim (unit drops commands < 250 ms apart);");
    println!("spacing is counted from the end of the previous command at 4800 baud 7E1, as the driver does");
    println!(
        "{:>12} {:>8} {:>12} {:>10} {:>14}",
        "spacing ms", "cycles", "median s", "failed", "unit dropped"
    );
    let mut median_260 = f64::NAN;
    for spacing in [200u64, 240, 250, 260] {
        let before = dropped(control);
        let mut link = Link::new(
            open(&ep, &serial, Duration::from_secs(3)).await.unwrap(),
            Duration::from_millis(spacing),
            Duration::from_millis(400),
        )
        .with_line_speed(&serial);
        let mut times = Vec::new();
        let mut failed = 0;
        for _ in 0..5 {
            let t0 = Instant::now();
            match read_all(&mut link).await {
                Ok(_) => times.push(t0.elapsed().as_secs_f64()),
                Err(_) => failed += 1,
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        if spacing == 260 {
            median_260 = median;
        }
        println!(
            "{:>12} {:>8} {:>12.3} {:>10} {:>14}",
            spacing,
            times.len(),
            median,
            failed,
            dropped(control) - before
        );
        // Let the unit's spacing window pass before the next series.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let python = 9.0 * (0.100 + 0.250);
    println!(
        "shipped pacing (260 ms): {median_260:.3} s per cycle vs Python's fixed sleeps ~{python:.2} s (measured there ~3.1 s): {:.2}x faster",
        3.1 / median_260
    );
}
