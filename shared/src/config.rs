//! YAML configuration loading.
//!
//! Every service reads a YAML file into its own `serde` struct through [`load`]. A
//! mistake in the file produces a [`ConfigError`] that names the file, the key path
//! (`broker.listeners.mqtt`) and the line, so a person can fix it without reading code.
//!
//! Before parsing, `${VAR}` and `${VAR:-default}` are replaced by environment variables
//! (as Telegraf does), so URLs and secrets can stay out of the file. An unset variable
//! without a default is an error naming the variable and the line. The value is pasted
//! as-is: quote the reference (`password: "${MQTT_PASSWORD}"`) when the value may hold
//! YAML syntax such as ` #`, `: ` or `{`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file could not be read, parsed or validated.
#[derive(Debug)]
pub struct ConfigError {
    /// The file (or other origin) the configuration came from.
    pub origin: PathBuf,
    /// Dotted key path of the offending value, when known (`broker.auth.credentials_file`).
    pub key: Option<String>,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What is wrong, in words.
    pub message: String,
}

impl ConfigError {
    /// An error about a value that parsed but is not acceptable.
    pub fn invalid(origin: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.to_path_buf(),
            key: Some(key.to_string()),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin.display())?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Checks a configuration after it has been parsed (ranges, cross-field rules).
///
/// Errors name the key: `Err(("mqtt.keep_alive_secs", "must be > 0"))`.
pub trait Validate {
    /// Returns the first problem found, as (key path, message).
    fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

/// Reads, expands, parses and validates a YAML file.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        origin: path.to_path_buf(),
        key: None,
        line: None,
        message: format!("cannot read file: {e}"),
    })?;
    from_str(&text, path)
}

/// Parses and validates YAML text; `origin` is only used in error messages.
pub fn from_str<T: DeserializeOwned + Validate>(
    text: &str,
    origin: &Path,
) -> Result<T, ConfigError> {
    let text = expand_env(text, origin, |name| std::env::var(name).ok())?;
    if text.trim().is_empty() {
        return Err(ConfigError {
            origin: origin.to_path_buf(),
            key: None,
            line: None,
            message: "the file is empty".into(),
        });
    }
    let de = serde_yaml::Deserializer::from_str(&text);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.location().map(|l| l.line());
        // serde_yaml appends " at line N column M" itself; we report the line separately.
        let mut message = inner.to_string();
        if let Some(pos) = message.find(" at line ") {
            message.truncate(pos);
        }
        ConfigError {
            origin: origin.to_path_buf(),
            // serde_path_to_error writes `?` for positions a syntax error hides.
            key: (key != "." && !key.is_empty() && !key.contains('?')).then_some(key),
            line,
            message,
        }
    })?;
    value.validate().map_err(|(key, message)| ConfigError {
        line: key_line(&text, &key),
        ..ConfigError::invalid(origin, &key, message)
    })?;
    Ok(value)
}

/// Best-effort line of a dotted key path (`channels.0.lv.setV`,
/// `steps[2].repeat.steps[1].cooling.temp`) in YAML `text`, for errors found after
/// parsing. Each component is looked for after its parent, inside the parent's block
/// (deeper indentation) or on the parent's own line (flow style: `"0": {lv: {setV:
/// 30}}`); `name[i]` is the i-th `- ` item of a block list. Falls back to the deepest
/// component found.
pub fn key_line(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    // The line found last, and whether it is a list item (`- key: ...`), whose own
    // content starts after the dash and whose block is deeper than the dash.
    let mut found: Option<(usize, bool)> = None;
    for part in key.split('.') {
        let mut pieces = part.split('[');
        let name = pieces.next().unwrap_or(part);
        let indices: Vec<usize> = pieces
            .filter_map(|p| p.trim_end_matches(']').parse().ok())
            .collect();
        if !name.is_empty() {
            let start = found.map_or(0, |f| f.0);
            let parent_indent = found.map(|(i, item)| indent(lines[i]) + usize::from(item));
            let mut hit = None;
            for (i, line) in lines.iter().enumerate().skip(start) {
                let code = line.split(" #").next().unwrap_or(line);
                if code.trim().is_empty() || code.trim_start().starts_with('#') {
                    continue;
                }
                let own = found.is_some_and(|f| f.0 == i);
                // Past the parent's block: the key is not in the file (a default).
                if !own && parent_indent.is_some_and(|p| indent(code) <= p) {
                    break;
                }
                let after = match found {
                    // An item's line: what follows its dash.
                    Some((_, true)) if own => code.trim_start().strip_prefix('-').unwrap_or(""),
                    // On the parent's line only what follows the parent's own key counts.
                    _ if own => code.find(':').map_or("", |c| &code[c + 1..]),
                    _ => code,
                };
                if has_key(after, name) {
                    hit = Some(i);
                    break;
                }
            }
            match hit {
                Some(i) => found = Some((i, false)),
                None => break,
            }
        }
        for n in indices {
            let Some((at, _)) = found else { break };
            match nth_item(&lines, at, n) {
                Some(i) => found = Some((i, true)),
                None => return found.map(|f| f.0 + 1),
            }
        }
    }
    found.map(|f| f.0 + 1)
}

/// The line of the `n`-th item (from 0) of the block list under the key on line `at`.
fn nth_item(lines: &[&str], at: usize, n: usize) -> Option<usize> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let parent = indent(lines[at]);
    let mut item_indent = None;
    let mut count = 0;
    for (i, line) in lines.iter().enumerate().skip(at + 1) {
        let code = line.split(" #").next().unwrap_or(line);
        let t = code.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let ind = indent(code);
        let is_item = t == "-" || t.starts_with("- ");
        match item_indent {
            // A list under a key may sit at the key's own indentation.
            None if is_item && ind >= parent => item_indent = Some(ind),
            None => return None,
            Some(ii) if ind < ii || (ind == ii && !is_item) => return None,
            Some(_) => {}
        }
        if Some(ind) == item_indent && is_item {
            if count == n {
                return Some(i);
            }
            count += 1;
        }
    }
    None
}

/// Whether `name:` stands in `code` as a mapping key (block or flow style, quoted or
/// not).
fn has_key(code: &str, name: &str) -> bool {
    for pat in [
        format!("{name}:"),
        format!("\"{name}\":"),
        format!("'{name}':"),
    ] {
        let mut from = 0;
        while let Some(p) = code[from..].find(&pat) {
            let at = from + p;
            let before = code[..at].trim_end().chars().last();
            let after = code[at + pat.len()..].chars().next();
            if matches!(before, None | Some('{' | ',' | '-')) && matches!(after, None | Some(' ')) {
                return true;
            }
            // Past this match's first character, which may be more than one byte.
            from = at + code[at..].chars().next().map_or(1, char::len_utf8);
        }
    }
    false
}

/// Replaces `${VAR}` and `${VAR:-default}` with values from `lookup`. Comment lines are
/// left alone so that documentation in the file can mention variables freely.
pub fn expand_env(
    text: &str,
    origin: &Path,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (lineno, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') || !line.contains("${") {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(ConfigError {
                    origin: origin.to_path_buf(),
                    key: None,
                    line: Some(lineno + 1),
                    message: "unterminated `${` (environment variable reference)".into(),
                });
            };
            let expr = &after[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(ConfigError {
                    origin: origin.to_path_buf(),
                    key: None,
                    line: Some(lineno + 1),
                    message: format!("`${{{expr}}}` is not a valid environment variable reference"),
                });
            }
            match lookup(name).filter(|v| !v.is_empty()).or(default.map(str::to_string)) {
                Some(v) => out.push_str(&v),
                None => {
                    return Err(ConfigError {
                        origin: origin.to_path_buf(),
                        key: None,
                        line: Some(lineno + 1),
                        message: format!(
                            "environment variable {name} is not set (write `${{{name}:-default}}` to give a default)"
                        ),
                    })
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// The error of a [`Validate::validate`]: `key` is invalid, because `message`.
pub fn invalid<T>(
    key: impl Into<String>,
    message: impl Into<String>,
) -> Result<T, (String, String)> {
    Err((key.into(), message.into()))
}

/// Resolves a path written in a config file relative to the directory of that file.
pub fn relative_to(config_file: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    config_file
        .parent()
        .map(|dir| dir.join(path))
        .unwrap_or_else(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_lines_follow_the_key_path() {
        let text = "safety:\n  interlock: x\n  hv_safe_voltage: -5\ntiming: {refresh_secs: 1}\nchannels:\n  \"0\": {lv: {board: 0, setV: 13.0}}\n  \"1\": {lv: {board: 1, setV: 30}, hv: {setV: 2}}\nbatch:\n  interval_ms: 5\nother:\n  size: 0\n";
        assert_eq!(key_line(text, "safety.hv_safe_voltage"), Some(3));
        assert_eq!(key_line(text, "channels.1.lv.setV"), Some(7));
        assert_eq!(key_line(text, "channels.1.hv.setV"), Some(7));
        assert_eq!(key_line(text, "timing.refresh_secs"), Some(4));
        // Not in its section (a default): the section's line, never another section's key.
        assert_eq!(key_line(text, "batch.size"), Some(8));
        assert_eq!(key_line(text, "nothing.here"), None);
    }

    #[test]
    fn validation_lines_find_list_items() {
        let text = "steps:\n  - soak: {secs: 1}\n  # a comment\n  - repeat:\n      count: 3\n      steps:\n      - soak: {secs: 5}\n      - cooling: {temp: -80}\n  - hv: {set: 900}\nrules:\n- name: a\n- name: b\n  hold: 2\n";
        assert_eq!(key_line(text, "steps[0].soak.secs"), Some(2));
        assert_eq!(key_line(text, "steps[1].repeat.count"), Some(5));
        assert_eq!(
            key_line(text, "steps[1].repeat.steps[1].cooling.temp"),
            Some(8)
        );
        assert_eq!(key_line(text, "steps[2].hv.set"), Some(9));
        assert_eq!(key_line(text, "rules[1].hold"), Some(13));
        assert_eq!(key_line(text, "rules[1].name"), Some(12));
        // An index past the end: the list's own line.
        assert_eq!(key_line(text, "steps[7].hv"), Some(1));
    }
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        port: u16,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[allow(dead_code)]
        name: String,
        inner: Inner,
    }

    impl Validate for Outer {
        fn validate(&self) -> Result<(), (String, String)> {
            if self.inner.port == 0 {
                return Err(("inner.port".into(), "must not be 0".into()));
            }
            Ok(())
        }
    }

    fn parse(text: &str) -> Result<Outer, ConfigError> {
        from_str(text, Path::new("test.yaml"))
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let err = parse("name: x\ninner:\n  port: seventy\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("inner.port"));
        assert_eq!(err.line, Some(3));
        let text = err.to_string();
        assert!(
            text.starts_with("test.yaml, line 3, key `inner.port`: "),
            "{text}"
        );
        assert!(
            text.contains("invalid value") || text.contains("invalid type"),
            "{text}"
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = parse("name: x\ninner:\n  port: 1\n  prot: 2\n").unwrap_err();
        assert!(err.message.contains("unknown field `prot`"), "{err}");
        assert_eq!(err.line, Some(4));
    }

    #[test]
    fn missing_key_is_named() {
        let err = parse("name: x\ninner: {}\n").unwrap_err();
        assert!(err.message.contains("missing field `port`"), "{err}");
        assert_eq!(err.key.as_deref(), Some("inner"));
    }

    #[test]
    fn broken_yaml_gives_line() {
        let err = parse("name: x\ninner:\n  port: [1, 2\n").unwrap_err();
        assert!(err.line.is_some(), "{err}");
    }

    #[test]
    fn empty_file_is_an_error() {
        let err = parse("\n  \n").unwrap_err();
        assert!(err.message.contains("empty"), "{err}");
    }

    #[test]
    fn validation_error_names_key_and_line() {
        let err = parse("name: x\ninner:\n  port: 0\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("inner.port"));
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("must not be 0"));
    }

    #[test]
    fn env_expansion() {
        let env = |n: &str| (n == "PORT").then(|| "1883".to_string());
        let o = Path::new("t.yaml");
        assert_eq!(expand_env("p: ${PORT}\n", o, env).unwrap(), "p: 1883\n");
        assert_eq!(expand_env("p: ${NOPE:-7}\n", o, env).unwrap(), "p: 7\n");
        assert_eq!(expand_env("# ${NOPE}\n", o, env).unwrap(), "# ${NOPE}\n");
        let err = expand_env("a: 1\np: ${NOPE}\n", o, env).unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("NOPE is not set"), "{err}");
        assert!(expand_env("p: ${BAD NAME}\n", o, env).is_err());
        assert!(expand_env("p: ${OPEN\n", o, env).is_err());
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let p = relative_to(Path::new("/etc/dcs/dcs.yaml"), Path::new("users.passwd"));
        assert_eq!(p, PathBuf::from("/etc/dcs/users.passwd"));
        let p = relative_to(Path::new("/etc/dcs/dcs.yaml"), Path::new("/abs/x"));
        assert_eq!(p, PathBuf::from("/abs/x"));
    }
}
