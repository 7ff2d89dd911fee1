//! The channels: e-mail over SMTP (lettre, rustls; STARTTLS, implicit TLS, or none for
//! a relay on the same host) and webhooks (HTTP POST of JSON, ureq). Each says whether
//! a failed delivery is worth retrying.

use std::path::Path;
use std::time::Duration;

use dcs_shared::outbox::Delivery;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::{ChannelKind, EmailConfig, Security, WebhookConfig, WebhookFormat};
use crate::engine::Notification;
use crate::render;

/// A channel ready to send.
pub enum Channel {
    /// SMTP.
    Email {
        /// The transport (pooled connection, TLS as configured).
        transport: AsyncSmtpTransport<Tokio1Executor>,
        /// Settings.
        cfg: EmailConfig,
    },
    /// A JSON-lines file.
    File {
        /// Where (resolved).
        path: std::path::PathBuf,
    },
    /// HTTP POST.
    Webhook {
        /// The HTTP agent (timeout set).
        agent: ureq::Agent,
        /// Settings.
        cfg: WebhookConfig,
    },
}

/// The SMTP password: from the environment or a file, never from the config itself.
fn password(cfg: &EmailConfig, config_file: &Path) -> Result<Option<String>, String> {
    if let Some(var) = &cfg.password_env {
        return std::env::var(var)
            .map(Some)
            .map_err(|_| format!("the SMTP password variable `{var}` is not set"));
    }
    if let Some(f) = &cfg.password_file {
        let path = dcs_shared::config::relative_to(config_file, f);
        return std::fs::read_to_string(&path)
            .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_string()))
            .map_err(|e| format!("cannot read the SMTP password file {}: {e}", path.display()));
    }
    Ok(None)
}

impl Channel {
    /// Builds the channel of `kind`; `config_file` resolves a relative password file.
    pub fn new(kind: &ChannelKind, config_file: &Path) -> Result<Channel, String> {
        match kind {
            ChannelKind::Email(cfg) => {
                let mut b = match cfg.security {
                    Security::Starttls => {
                        AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&cfg.host)
                            .map_err(|e| format!("SMTP {}: {e}", cfg.host))?
                    }
                    Security::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&cfg.host)
                        .map_err(|e| format!("SMTP {}: {e}", cfg.host))?,
                    Security::None => {
                        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host)
                    }
                };
                b = b
                    .port(cfg.port)
                    .timeout(Some(Duration::from_secs_f64(cfg.timeout_secs)));
                if let (Some(user), Some(pw)) = (&cfg.username, password(cfg, config_file)?) {
                    b = b.credentials(Credentials::new(user.clone(), pw));
                }
                Ok(Channel::Email {
                    transport: b.build(),
                    cfg: cfg.clone(),
                })
            }
            ChannelKind::File(f) => Ok(Channel::File {
                path: dcs_shared::config::relative_to(config_file, &f.path),
            }),
            ChannelKind::Webhook(cfg) => {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_secs)))
                    .http_status_as_error(false)
                    .build()
                    .into();
                Ok(Channel::Webhook {
                    agent,
                    cfg: cfg.clone(),
                })
            }
        }
    }

    /// Sends `n`.
    pub async fn send(&self, n: &Notification) -> Delivery {
        match self {
            Channel::Email { transport, cfg } => {
                let mut m = Message::builder()
                    .subject(render::subject(n))
                    .header(ContentType::TEXT_PLAIN);
                // Addresses were checked with the config.
                match cfg.from.parse() {
                    Ok(a) => m = m.from(a),
                    Err(e) => return Delivery::Reject(format!("from `{}`: {e}", cfg.from)),
                }
                for to in &cfg.to {
                    match to.parse() {
                        Ok(a) => m = m.to(a),
                        Err(e) => return Delivery::Reject(format!("to `{to}`: {e}")),
                    }
                }
                let message = match m.body(render::text(n)) {
                    Ok(m) => m,
                    Err(e) => return Delivery::Reject(format!("cannot build the message: {e}")),
                };
                // Every refusal is retried, permanent ones too: a 535 (login) or a 550
                // (a recipient, the relay) is a setting to fix, and the alarm must still
                // go out once it is; the error stays on the status meanwhile.
                match transport.send(message).await {
                    Ok(_) => Delivery::Done,
                    Err(e) => Delivery::Retry(format!("SMTP {}:{}: {e}", cfg.host, cfg.port)),
                }
            }
            Channel::File { path } => {
                use std::io::Write as _;
                let line = render::generic(n).to_string();
                let r = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| writeln!(f, "{line}").and_then(|()| f.sync_data()));
                match r {
                    Ok(()) => Delivery::Done,
                    Err(e) => Delivery::Retry(format!("{}: {e}", path.display())),
                }
            }
            Channel::Webhook { agent, cfg } => {
                let body = match cfg.format {
                    WebhookFormat::Mattermost => render::mattermost(n),
                    WebhookFormat::Json => render::generic(n),
                }
                .to_string();
                let (agent, url) = (agent.clone(), cfg.url.clone());
                let r = tokio::task::spawn_blocking(move || {
                    agent
                        .post(&url)
                        .header("Content-Type", "application/json")
                        .send(body.as_str())
                        .map(|r| r.status().as_u16())
                })
                .await;
                match r {
                    Ok(Ok(s)) if (200..300).contains(&s) => Delivery::Done,
                    // The receiver refuses this body: retrying cannot help. Anything else
                    // (401/403/404: a token or hook to fix, 429, 5xx) is retried, with the
                    // error on the status.
                    Ok(Ok(s)) if matches!(s, 400 | 413 | 415 | 422) => {
                        Delivery::Reject(format!("webhook answered {s}: body refused"))
                    }
                    Ok(Ok(s)) => Delivery::Retry(format!("webhook answered {s}")),
                    Ok(Err(e)) => Delivery::Retry(format!("webhook: {e}")),
                    Err(e) => Delivery::Retry(format!("webhook task: {e}")),
                }
            }
        }
    }
}
