//! The command-line backend: `<program> <args> -f <xml> -c <calibration>` started in
//! the working directory, without a shell, its output parsed line by line.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use dcs_shared::shutdown::CancellationToken;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::{Limits, Outcome, RunEvent};
use crate::commands::RunPlan;
use crate::config::CliSettings;

/// What one output line says.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// `>>>> Progress :  42.0% <<<<`.
    Progress(f64),
    /// `Run 500749 started`.
    RunStarted(u64),
    /// Anything else.
    Other,
}

/// Parses one line of Ph2_ACF output.
pub fn parse_line(line: &str) -> Line {
    if let Some(rest) = line.split(">>>> Progress :").nth(1) {
        if let Some(num) = rest.split('%').next() {
            if let Ok(p) = num.trim().parse::<f64>() {
                if p.is_finite() {
                    return Line::Progress(p.clamp(0.0, 100.0));
                }
            }
        }
    }
    if let Some(i) = line.find("Run ") {
        let mut words = line[i + 4..].split_whitespace();
        if let (Some(n), Some("started")) = (words.next(), words.next()) {
            if let Ok(n) = n.parse() {
                return Line::RunStarted(n);
            }
        }
    }
    Line::Other
}

fn pump(out: impl AsyncRead + Unpin + Send + 'static, tx: mpsc::UnboundedSender<String>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        // A line that is not UTF-8 ends this reader; the process is still watched.
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
}

/// Runs the tool; see the module doc.
pub async fn execute(
    cli: &CliSettings,
    work_dir: &Path,
    plan: &RunPlan,
    limits: Limits,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: CancellationToken,
) -> Outcome {
    let program = cli.program.display().to_string();
    let mut child = match Command::new(&cli.program)
        .args(&cli.args)
        .arg("-f")
        .arg(&plan.config_file)
        .arg("-c")
        .arg(&plan.calibration)
        .current_dir(work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Outcome::failed(format!(
                "cannot start {program} in {}: {e}",
                work_dir.display()
            ))
        }
    };
    let (tx, mut lines) = mpsc::unbounded_channel();
    if let Some(o) = child.stdout.take() {
        pump(o, tx.clone());
    }
    if let Some(e) = child.stderr.take() {
        pump(e, tx);
    }
    let deadline = tokio::time::Instant::now() + limits.run;
    let mut last_line = String::new();
    let failure = loop {
        tokio::select! {
            status = child.wait() => {
                // Drain what the pipes still hold: the last lines say why it ended.
                while let Ok(l) = lines.try_recv() {
                    note(&l, &events, &mut last_line);
                }
                return match status {
                    Ok(s) if s.success() => Outcome::done(),
                    Ok(s) => Outcome::failed(exit_reason(&program, s, &last_line)),
                    Err(e) => Outcome::failed(format!("cannot wait for {program}: {e}")),
                };
            }
            l = lines.recv() => match l {
                Some(l) => note(&l, &events, &mut last_line),
                // Both pipes closed: only the exit status is left to wait for.
                None => {
                    match tokio::time::timeout_at(deadline, child.wait()).await {
                        Ok(Ok(s)) if s.success() => return Outcome::done(),
                        Ok(Ok(s)) => return Outcome::failed(exit_reason(&program, s, &last_line)),
                        Ok(Err(e)) => return Outcome::failed(format!("cannot wait for {program}: {e}")),
                        Err(_) => break format!("{program} exceeded the run timeout ({} s)", limits.run.as_secs()),
                    }
                }
            },
            _ = tokio::time::sleep(limits.stall) => {
                break format!(
                    "no output from {program} for {} s: Ph2_ACF hung (last line: {})",
                    limits.stall.as_secs(), shown(&last_line)
                );
            }
            _ = tokio::time::sleep_until(deadline) => {
                break format!("{program} exceeded the run timeout ({} s)", limits.run.as_secs());
            }
            _ = stop.cancelled() => {
                interrupt(&child);
                // Give it time to close its result file, then kill it.
                let grace = Duration::from_secs(5);
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                return Outcome::stopped();
            }
        }
    };
    let _ = child.kill().await;
    Outcome::failed(failure)
}

fn note(line: &str, events: &mpsc::UnboundedSender<RunEvent>, last: &mut String) {
    match parse_line(line) {
        Line::Progress(p) => {
            let _ = events.send(RunEvent::Progress(p));
        }
        Line::RunStarted(n) => {
            let _ = events.send(RunEvent::RunNumber(n));
        }
        Line::Other => {}
    }
    tracing::debug!(line, "ph2acf output");
    if !line.trim().is_empty() {
        *last = dcs_shared::command::truncate(line.trim(), 200);
    }
}

fn shown(line: &str) -> &str {
    if line.is_empty() {
        "none"
    } else {
        line
    }
}

fn interrupt(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        );
    }
}

fn exit_reason(program: &str, s: std::process::ExitStatus, last: &str) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!(
            "{program} exited with code {c} (last line: {})",
            shown(last)
        ),
        (None, Some(sig)) => {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("?");
            format!(
                "{program} crashed: killed by signal {sig} ({name}) (last line: {})",
                shown(last)
            )
        }
        _ => format!("{program} ended abnormally"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines() {
        assert_eq!(
            parse_line(">>>> Progress :  42.0% <<<<"),
            Line::Progress(42.0)
        );
        assert_eq!(
            parse_line("|10:00:01|I|>>>> Progress : 100.0% <<<<"),
            Line::Progress(100.0)
        );
        assert_eq!(
            parse_line("|10:00:01.5|I| Run 500749 started"),
            Line::RunStarted(500749)
        );
        assert_eq!(parse_line("Run 12 stopped"), Line::Other);
        assert_eq!(parse_line(">>>> Progress : nan% <<<<"), Line::Other);
        assert_eq!(
            parse_line(">>>> Progress : 250% <<<<"),
            Line::Progress(100.0)
        );
        assert_eq!(parse_line("Run  started"), Line::Other);
        assert_eq!(parse_line(""), Line::Other);
    }
}
