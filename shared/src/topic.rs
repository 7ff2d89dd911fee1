//! MQTT topic filters and the `{n}` templates that turn topic levels into names.

/// Whether `topic` (or a filter) is a command topic: one of its levels is exactly
/// `cmd` (`julabo/cmd/start`, `dcs/cmd/switch/lv`, `alarms/cmd`, `julabo/cmd/#`).
pub fn is_command_topic(topic: &str) -> bool {
    topic.split('/').any(|l| l == "cmd")
}

/// Checks a name used as one MQTT topic level (a service, channel, board or rule
/// name): not empty, no `/`, `+`, `#`, whitespace or control characters, and not
/// starting with `$` (the broker's own topics). The one rule for every config.
pub fn check_level(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.contains(['/', '+', '#'])
        || s.contains(|c: char| c.is_whitespace() || c.is_control())
        || s.starts_with('$')
    {
        return Err(format!(
            "`{}` must be one MQTT topic level: not empty, no `/`, `+`, `#`, spaces or control characters, not starting with `$`",
            s.escape_debug()
        ));
    }
    Ok(())
}

/// Checks an MQTT topic filter: `+` and `#` only as whole levels, `#` only last.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("empty topic filter".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        if wild && level.len() > 1 {
            return Err(format!(
                "`{filter}`: a wildcard must be a whole level (`{level}`)"
            ));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(format!("`{filter}`: `#` must be the last level"));
        }
    }
    Ok(())
}

/// Whether `topic` matches `filter` (MQTT 3.1.1 section 4.7; `$` topics only match
/// filters that name them).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `specific` matches is also matched by `general`.
pub fn covers(general: &str, specific: &str) -> bool {
    let mut g = general.split('/');
    let mut s = specific.split('/');
    loop {
        match (g.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(_), Some("+")) => return false,
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic matches both filters.
pub fn intersects(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            // `a/#` also matches `a`.
            (None, Some(rest)) | (Some(rest), None) => {
                return rest == "#";
            }
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
    }
}

/// The filters to subscribe to: those covered by another are left out, because a
/// broker delivers a message once per matching subscription.
pub fn minimal_set(filters: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let covered = filters
            .iter()
            .enumerate()
            .any(|(j, g)| j != i && covers(g, f) && (!covers(f, g) || j < i));
        if !covered {
            out.push(f.clone());
        }
    }
    out
}

/// Levels a filter always has (a `#` matches zero levels or more), and whether it has
/// no upper bound.
pub fn min_levels(filter: &str) -> (usize, bool) {
    let n = filter.split('/').count();
    if filter.ends_with('#') {
        (n - 1, true)
    } else {
        (n, false)
    }
}

/// A name built from fixed text and topic levels: `{3}_{4}` on `ESP01/sensors/BME/temp`
/// gives `BME_temp` (levels count from 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Level(usize),
}

impl Template {
    /// Parses `text`; `{{` and `}}` are literal braces.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut num = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(d) => num.push(d),
                            None => return Err(format!("`{text}`: unclosed `{{`")),
                        }
                    }
                    let n: usize = num.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        format!(
                            "`{text}`: `{{{num}}}` is not a topic level (use {{1}}, {{2}}, ...)"
                        )
                    })?;
                    if !lit.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Level(n));
                }
                '}' => return Err(format!("`{text}`: unmatched `}}`")),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        if parts.is_empty() {
            return Err("empty name".into());
        }
        Ok(Template { parts })
    }

    /// The highest topic level used, 0 for none.
    pub fn max_level(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Level(n) => *n,
                Part::Text(_) => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// The fixed text, when the template uses no topic level.
    pub fn as_fixed(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Text(t)] => Some(t),
            _ => None,
        }
    }

    /// Fills the template from `topic`; `None` when the topic is too short.
    pub fn render(&self, topic: &str) -> Option<String> {
        if let Some(t) = self.as_fixed() {
            return Some(t.to_string());
        }
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Level(n) => out.push_str(levels.get(n - 1)?),
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_levels() {
        for ok in ["dcs", "julabo", "ESP01", "module_0", "0"] {
            assert!(check_level(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "+",
            "a#",
            "two words",
            "tab\t",
            "$SYS",
            "nul\u{0}",
        ] {
            assert!(check_level(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn filters() {
        assert!(check_filter("ESP01/sensors/+/+").is_ok());
        assert!(check_filter("dcs/#").is_ok());
        assert!(check_filter("#").is_ok());
        assert!(check_filter("dcs/#/x").unwrap_err().contains("last"));
        assert!(check_filter("dcs/a+").unwrap_err().contains("whole level"));
        assert!(check_filter("").is_err());
    }

    #[test]
    fn matching() {
        assert!(matches("+/sensors/+/+", "ESP01/sensors/BME/temp"));
        assert!(!matches("+/sensors/+/+", "ESP01/sensors/BME"));
        assert!(!matches("+/sensors/+/+", "ESP01/sensors/BME/temp/x"));
        assert!(matches("dcs/#", "dcs"));
        assert!(matches("dcs/#", "dcs/channels"));
        assert!(matches("dcs/status", "dcs/status"));
        assert!(!matches("dcs/status", "dcs/statu"));
        assert!(!matches("#", "$SYS/broker"));
        assert!(matches("$SYS/#", "$SYS/broker"));
        assert!(matches("a/+/c", "a//c"));
    }

    #[test]
    fn coverage_and_overlap() {
        assert!(covers("lab/#", "lab/json/#"));
        assert!(covers("lab/#", "lab"));
        assert!(covers("+/sensors/+/+", "ESP01/sensors/BME/temp"));
        assert!(!covers("lab/json/#", "lab/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(intersects("a/+/c", "a/b/+"));
        assert!(intersects("a/#", "a"));
        assert!(!intersects("a/b", "a/c"));
        assert!(!intersects("a/+", "a/b/c"));
        assert!(intersects("+/sensors/+/+", "ESP01/#"));
        let f = |v: &[&str]| minimal_set(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(f(&["lab/json/#", "lab/+/+", "lab/#"]), vec!["lab/#"]);
        assert_eq!(f(&["a", "a", "b/+"]), vec!["a", "b/+"]);
    }

    #[test]
    fn templates() {
        let t = Template::parse("{3}_{4}").unwrap();
        assert_eq!(
            t.render("ESP01/sensors/BME/temp").as_deref(),
            Some("BME_temp")
        );
        assert_eq!(t.max_level(), 4);
        assert_eq!(t.render("a/b/c"), None);
        let t = Template::parse("sensors").unwrap();
        assert_eq!(t.as_fixed(), Some("sensors"));
        assert_eq!(
            Template::parse("a{{b}}{1}").unwrap().render("x").unwrap(),
            "a{b}x"
        );
        assert!(Template::parse("{0}")
            .unwrap_err()
            .contains("not a topic level"));
        assert!(Template::parse("{x").unwrap_err().contains("unclosed"));
        assert!(Template::parse("x}").unwrap_err().contains("unmatched"));
        assert!(Template::parse("").is_err());
    }
}
