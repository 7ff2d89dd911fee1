//! The middleware backend: the MiddlewareController protocol of SPEC 6.1 over TCP.
//! `Initialize`, `Configure`, `Start`, then `Status?` every `poll_ms` until `Done`,
//! then `Stop` and `Halt`. Every request has a reply timeout; any unexpected reply
//! ends the run as failed with Ph2_ACF's words.

use std::path::Path;
use std::time::Duration;

use dcs_shared::shutdown::CancellationToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{Limits, Outcome, RunEvent};
use crate::commands::RunPlan;
use crate::config::MiddlewareSettings;
use crate::results;

/// Largest reply accepted.
pub const MAX_FRAME: usize = 64 * 1024;

/// Frames `text`: 4-byte big-endian length counting itself, then the text.
pub fn frame(text: &str) -> Vec<u8> {
    let mut out = ((text.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

/// Takes one reply off the front of `buf`: `Ok(None)` until it is complete.
pub fn unframe(buf: &mut Vec<u8>) -> Result<Option<String>, String> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if !(4..=MAX_FRAME).contains(&len) {
        return Err(format!("bad frame length {len}: not a Ph2_ACF middleware"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let body: Vec<u8> = buf.drain(..len).skip(4).collect();
    String::from_utf8(body)
        .map(Some)
        .map_err(|_| "reply is not text".to_string())
}

struct Link {
    stream: TcpStream,
    buf: Vec<u8>,
    timeout: Duration,
}

impl Link {
    async fn request(&mut self, text: &str) -> Result<String, String> {
        self.stream.write_all(&frame(text)).await.map_err(|e| {
            format!("the middleware dropped the connection (sending `{text}`): {e}")
        })?;
        let read = async {
            let mut chunk = [0u8; 1024];
            loop {
                if let Some(reply) = unframe(&mut self.buf)? {
                    return Ok(reply);
                }
                match self.stream.read(&mut chunk).await {
                    Ok(0) => {
                        return Err(format!(
                        "the middleware dropped the connection (waiting for the reply to `{text}`)"
                    ))
                    }
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) => {
                        return Err(format!(
                            "the middleware dropped the connection (waiting for the reply to `{text}`): {e}"
                        ))
                    }
                }
            }
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the middleware did not answer `{text}` within {} s: Ph2_ACF hung",
                self.timeout.as_secs_f64()
            )),
        }
    }

    async fn expect(&mut self, text: &str, want: &str) -> Result<(), String> {
        let got = self.request(text).await?;
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "Ph2_ACF answered `{got}` to `{text}` (expected `{want}`)"
            ))
        }
    }
}

/// Runs `plan` on the middleware; see the module doc.
pub async fn execute(
    m: &MiddlewareSettings,
    work_dir: &Path,
    plan: &RunPlan,
    limits: Limits,
    events: mpsc::UnboundedSender<RunEvent>,
    stop: CancellationToken,
) -> Outcome {
    let timeout = Duration::from_secs_f64(m.reply_timeout_secs);
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(m.address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Outcome::failed(format!(
                "cannot reach the Ph2_ACF middleware at {}: {e}",
                m.address
            ))
        }
        Err(_) => {
            return Outcome::failed(format!(
                "no answer connecting to the Ph2_ACF middleware at {}",
                m.address
            ))
        }
    };
    let _ = stream.set_nodelay(true);
    let mut link = Link {
        stream,
        buf: Vec::new(),
        timeout: timeout.min(limits.stall),
    };
    let run_number = match results::next_run_number(work_dir) {
        Ok(n) => n,
        Err(e) => return Outcome::failed(format!("cannot take a run number: {e}")),
    };
    let configure = format!(
        "Configure,Calibration:{},ConfigurationFile:{}",
        plan.calibration,
        plan.config_file.display()
    );
    let setup = async {
        link.expect("Initialize", "InitializeDone").await?;
        link.expect(&configure, "ConfigureDone").await?;
        link.expect(&format!("Start:{{RunNumber:{run_number}}}"), "StartDone")
            .await
    };
    if let Err(e) = setup.await {
        return Outcome::failed(e);
    }
    let _ = events.send(RunEvent::RunNumber(run_number));
    let deadline = tokio::time::Instant::now() + limits.run;
    let poll = Duration::from_millis(m.poll_ms);
    let outcome = loop {
        tokio::select! {
            // A stop goes first: it takes the next free turn of the link, never waits
            // for another poll (the same rule as the chiller's commands).
            biased;
            _ = stop.cancelled() => break Outcome::stopped(),
            _ = tokio::time::sleep_until(deadline) => {
                break Outcome::failed(format!("run exceeded the run timeout ({} s)", limits.run.as_secs()));
            }
            _ = tokio::time::sleep(poll) => {}
        }
        match link.request("Status?").await.as_deref() {
            Ok("Running") => {}
            Ok("Done") => {
                let _ = events.send(RunEvent::Progress(100.0));
                break Outcome::done();
            }
            Ok(other) => break Outcome::failed(format!("Ph2_ACF answered `{other}` to `Status?`")),
            // Nothing more can be said to a server that is gone or hung.
            Err(e) => return Outcome::failed(e),
        }
    };
    // Close the run so Ph2_ACF writes its results; a failure here is recorded but does
    // not turn a finished run into a failed one.
    for (req, want) in [("Stop", "StopDone"), ("Halt", "HaltDone")] {
        if let Err(e) = link.expect(req, want).await {
            tracing::warn!(error = %e, "closing the run on the middleware");
            if outcome.status != super::RunStatus::Failed {
                return Outcome {
                    error: Some(format!("run ended but closing it failed: {e}")),
                    ..outcome
                };
            }
            break;
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let mut b = frame("StartDone");
        assert_eq!(b[..4], [0, 0, 0, 13]);
        b.extend(frame("Done"));
        assert_eq!(unframe(&mut b).unwrap().as_deref(), Some("StartDone"));
        assert_eq!(unframe(&mut b).unwrap().as_deref(), Some("Done"));
        assert_eq!(unframe(&mut b).unwrap(), None);
        assert!(unframe(&mut b"HTTP/1.1 200".to_vec()).is_err());
        assert_eq!(unframe(&mut vec![0, 0, 0, 9, b'a']).unwrap(), None);
    }
}
