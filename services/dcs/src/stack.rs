//! The stack config (`deploy/dcs.yaml`): the broker, the MQTT settings every service
//! shares, and which services and simulators run, each with its own config file.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use dcs_broker::BrokerConfig;
use dcs_shared::config::relative_to;
use dcs_shared::{ConfigError, MqttSettings, Validate};
use serde::Deserialize;

use crate::registry::{self, Kind};

/// The whole stack, as `dcs up` runs it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    /// Where generated credentials and service state live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How every service reaches the broker.
    #[serde(default)]
    pub mqtt: MqttSettings,
    /// The embedded broker; leave it out to use an external one (Mosquitto, EMQX).
    #[serde(default)]
    pub broker: Option<BrokerConfig>,
    /// Services to run, by name.
    #[serde(default)]
    pub services: BTreeMap<String, Entry>,
    /// Hardware simulators, run only by `dcs up --simulate`.
    #[serde(default)]
    pub simulators: BTreeMap<String, Entry>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(".dcs")
}

/// One service or simulator in the stack.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Set to false to keep the entry but not run it.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The component's own config file, relative to the stack config.
    #[serde(default)]
    pub config: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl Validate for StackConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        self.mqtt
            .check()
            .map_err(|(k, m)| (format!("mqtt.{k}"), m))?;
        if let Some(b) = &self.broker {
            b.validate().map_err(|(k, m)| (format!("broker.{k}"), m))?;
        }
        for (section, entries, kind) in [
            ("services", &self.services, Kind::Service),
            ("simulators", &self.simulators, Kind::Simulator),
        ] {
            for name in entries.keys() {
                if registry::find(name, kind).is_none() {
                    return Err((
                        format!("{section}.{name}"),
                        format!(
                            "unknown {}: known ones are {}",
                            kind.noun(),
                            registry::names(kind).join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl StackConfig {
    /// Loads the stack config and makes its paths absolute (relative to the file).
    pub fn load(path: &Path) -> Result<StackConfig, ConfigError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mut c: StackConfig = dcs_shared::config::load(&path)?;
        c.state_dir = relative_to(&path, &c.state_dir);
        if let Some(f) = &c.mqtt.password_file {
            c.mqtt.password_file = Some(relative_to(&path, f));
        }
        if let Some(f) = c
            .broker
            .as_mut()
            .and_then(|b| b.auth.password_file.as_mut())
        {
            *f = relative_to(&path, f);
        }
        for e in c.services.values_mut().chain(c.simulators.values_mut()) {
            if let Some(f) = &e.config {
                e.config = Some(relative_to(&path, f));
            }
        }
        c.mqtt = c.mqtt.with_env_overrides();
        Ok(c)
    }

    /// The enabled components in start order: broker, simulators, services.
    pub fn enabled(&self, simulate: bool) -> Vec<(&'static registry::Component, Option<PathBuf>)> {
        let mut out = Vec::new();
        if self.broker.is_some() {
            out.extend(registry::find("broker", Kind::Broker).map(|c| (c, None)));
        }
        let mut add = |entries: &BTreeMap<String, Entry>, kind| {
            for (name, e) in entries.iter().filter(|(_, e)| e.enabled) {
                if let Some(c) = registry::find(name, kind) {
                    out.push((c, e.config.clone()));
                }
            }
        };
        if simulate {
            add(&self.simulators, Kind::Simulator);
        }
        add(&self.services, Kind::Service);
        out
    }
}

impl StackConfig {
    /// Whether each service logs in with an account of its own, named as its MQTT
    /// client id: when the stack runs its own broker and generates the stack account's
    /// password (not when a password is given, e.g. for an external broker).
    fn own_accounts(&self) -> bool {
        self.broker.is_some()
            && self.mqtt.username.is_some()
            && self.mqtt.password.is_none()
            && self.mqtt.password_file.is_some()
    }

    /// The file holding the generated password of account `id`.
    pub fn account_secret(&self, id: &str) -> PathBuf {
        self.state_dir.join(format!("mqtt-{id}.secret"))
    }

    /// The MQTT settings of a component connecting with client id `client_id`: its own
    /// account of that name when the stack generates accounts (dcs-broker then lets
    /// nobody else use that client id), else the stack's.
    pub fn mqtt_for(&self, client_id: &str) -> MqttSettings {
        let mut m = self.mqtt.clone();
        if self.own_accounts()
            && m.username.as_deref() != Some(client_id)
            && account_name_ok(client_id)
        {
            m.username = Some(client_id.to_string());
            m.password_file = Some(self.account_secret(client_id));
        }
        m
    }
}

/// A client id usable as an account and file name.
fn account_name_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Makes sure the MQTT accounts exist when the stack runs its own broker: the stack's
/// (`mqtt.username`, used by the launcher and tools) and one per service client id in
/// `client_ids`, so that dcs-broker reserves each id to its service. On first start a
/// random password is written to the account's secret file (mode 0600) and its hash
/// added to the broker's password file. Returns a line for each account it changed.
pub fn ensure_service_accounts(
    stack: &StackConfig,
    client_ids: &[String],
) -> anyhow::Result<Vec<String>> {
    let Some(broker) = &stack.broker else {
        return Ok(Vec::new());
    };
    let (Some(user), Some(secret_file), Some(passwd_file)) = (
        stack.mqtt.username.as_deref(),
        stack.mqtt.password_file.as_deref(),
        broker.auth.password_file.as_deref(),
    ) else {
        return Ok(Vec::new());
    };
    if !stack.own_accounts() {
        return Ok(Vec::new());
    }
    let mut said = Vec::new();
    said.extend(ensure_account(user, secret_file, passwd_file)?);
    let mut done = std::collections::BTreeSet::from([user.to_string()]);
    for id in client_ids {
        if account_name_ok(id) && done.insert(id.clone()) {
            said.extend(ensure_account(id, &stack.account_secret(id), passwd_file)?);
        }
    }
    Ok(said)
}

/// Makes sure `user` has a password in `secret_file` and its hash in `passwd_file`.
fn ensure_account(
    user: &str,
    secret_file: &Path,
    passwd_file: &Path,
) -> anyhow::Result<Option<String>> {
    let mut created = false;
    let password = if secret_file.exists() {
        let text = std::fs::read_to_string(secret_file)
            .with_context(|| format!("cannot read MQTT password file {}", secret_file.display()))?;
        text.lines().next().unwrap_or("").to_string()
    } else {
        use rand::distributions::{Alphanumeric, DistString};
        let pw = Alphanumeric.sample_string(&mut rand::thread_rng(), 32);
        write_private(secret_file, &format!("{pw}\n"))?;
        created = true;
        pw
    };
    // Only a missing file is empty: an unreadable one must not be rewritten with our
    // user alone, which would lock every operator out.
    let existing = match std::fs::read_to_string(passwd_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("cannot read {}: {e}", passwd_file.display()),
    };
    let users = dcs_broker::auth::PasswordFile::parse(&existing)
        .map_err(|(line, m)| anyhow::anyhow!("{}, line {line}: {m}", passwd_file.display()))?;
    if users.verify(user, &password) {
        return Ok(created.then(|| {
            format!(
                "created MQTT password for `{user}` in {}",
                secret_file.display()
            )
        }));
    }
    // Replace any stale entry for this user, keep everyone else.
    let mut text: String = existing
        .lines()
        .filter(|l| l.split_once(':').map(|(u, _)| u) != Some(user))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&dcs_broker::auth::hash_entry(user, &password));
    text.push('\n');
    write_private(passwd_file, &text)?;
    Ok(Some(format!(
        "MQTT account `{user}`: password in {}, hash in {}",
        secret_file.display(),
        passwd_file.display()
    )))
}

/// Writes `text` to `path` with mode 0600, atomically (temporary file, then rename),
/// so a crash never leaves a half-written password file.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("dcs")
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_service_is_named_with_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dcs.yaml");
        std::fs::write(&f, "services:\n  caen-fms: {}\n").unwrap();
        let e = StackConfig::load(&f).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("services.caen-fms"));
        assert!(
            e.message.starts_with("unknown service: known ones are"),
            "{e}"
        );
    }

    #[test]
    fn account_is_created_once_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("dcs.yaml");
        std::fs::write(
            &f,
            "mqtt: {username: dcs, password_file: s/secret}\nbroker: {auth: {password_file: s/passwd}}\n",
        )
        .unwrap();
        let stack = StackConfig::load(&f).unwrap();
        let ids = [
            "interlock".to_string(),
            "dcs".to_string(),
            "bad/id".to_string(),
        ];
        let said = ensure_service_accounts(&stack, &ids).unwrap();
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[0].contains("MQTT account `dcs`"), "{said:?}");
        assert!(said[1].contains("MQTT account `interlock`"), "{said:?}");
        let secret = dir.path().join("s/secret");
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pw = std::fs::read_to_string(&secret).unwrap();
        let users = dcs_broker::auth::PasswordFile::load(&dir.path().join("s/passwd")).unwrap();
        assert!(users.verify("dcs", pw.trim()));
        // The interlock logs in with its own account, the FSM (client id `dcs`) with the
        // stack's; an id that cannot be a file name keeps the stack's.
        let own = stack.mqtt_for("interlock");
        assert_eq!(own.username.as_deref(), Some("interlock"));
        let ipw = own.resolve_password().unwrap().unwrap();
        assert!(users.verify("interlock", &ipw) && !users.verify("interlock", pw.trim()));
        assert_eq!(stack.mqtt_for("dcs").username.as_deref(), Some("dcs"));
        assert_eq!(stack.mqtt_for("bad/id").username.as_deref(), Some("dcs"));
        // Second start: nothing to do, same password.
        assert!(ensure_service_accounts(&stack, &ids).unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), pw);
        // A password file we cannot parse is reported, never overwritten.
        let passwd = dir.path().join("s/passwd");
        std::fs::write(&passwd, "operator:plaintext\n").unwrap();
        std::fs::write(&secret, "other\n").unwrap();
        let e = ensure_service_accounts(&stack, &ids)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&passwd).unwrap(),
            "operator:plaintext\n"
        );
    }
}
