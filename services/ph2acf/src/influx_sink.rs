//! Delivers queued `calibration_runs` lines with the shared InfluxDB writer.

use dcs_shared::influx::{InfluxSettings, InfluxWriter, WriteError};
use dcs_shared::shutdown::CancellationToken;
use std::sync::Arc;

use crate::outbox::{Delivery, Outbox};

/// Runs until `shutdown`.
pub async fn deliver(queue: Outbox, settings: InfluxSettings, shutdown: CancellationToken) {
    let writer = Arc::new(InfluxWriter::new(settings));
    queue
        .deliver(
            move |bytes| {
                let writer = writer.clone();
                async move {
                    let lines = String::from_utf8_lossy(&bytes).into_owned();
                    match tokio::task::spawn_blocking(move || writer.write(&lines)).await {
                        Ok(Ok(())) => Delivery::Done,
                        Ok(Err(e @ WriteError::Rejected { .. })) => Delivery::Reject(e.to_string()),
                        Ok(Err(e)) => Delivery::Retry(e.to_string()),
                        Err(e) => Delivery::Retry(format!("writer task: {e}")),
                    }
                }
            },
            shutdown,
        )
        .await;
}
