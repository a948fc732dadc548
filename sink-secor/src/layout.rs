//! Where a topic's hour lives in the bucket: `{prefix}/` + the topic's path template, rendered
//! with strftime for the hour (UTC). The default, `{topic}/dt=%Y-%m-%d/hr=%H`, is the Hive
//! layout BigQuery's hive partitioning reads; a topic may have its own template.

use chrono::format::{Item, StrftimeItems};
use std::collections::{BTreeMap, HashSet};

pub const DEFAULT_TEMPLATE: &str = "{topic}/dt=%Y-%m-%d/hr=%H";
const HIVE_SUFFIX: &str = "dt=%Y-%m-%d/hr=%H";

#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
    default: String,
    per_topic: BTreeMap<String, String>,
}

impl Layout {
    pub fn new(prefix: &str, default: &str, per_topic: &BTreeMap<String, String>) -> Self {
        Layout { prefix: prefix.to_string(), default: default.to_string(), per_topic: per_topic.clone() }
    }

    fn template(&self, topic: &str) -> &str {
        self.per_topic.get(topic).map_or(&self.default, String::as_str)
    }

    /// The hour's directory, ending in `/`.
    pub fn hour_dir(&self, topic: &str, hour: i64) -> String {
        let rendered = render(self.template(topic), topic, hour);
        format!("{}/", crate::join_key(&self.prefix, rendered.trim_matches('/')))
    }

    /// For a Hive-style template (`…/dt=%Y-%m-%d/hr=%H`): the directory the `dt=` level sits in.
    pub fn hive_base(&self, topic: &str) -> Option<String> {
        let template = self.template(topic).trim_end_matches('/');
        let base = template.strip_suffix(HIVE_SUFFIX)?.trim_end_matches('/');
        (!base.contains('%')).then(|| crate::join_key(&self.prefix, &base.replace("{topic}", topic)))
    }
}

/// Parses a UTC hour written `YYYY-MM-DDTHH` into hours since the epoch; `flag` names the input
/// in the error.
pub fn parse_hour(flag: &str, hour: &str) -> anyhow::Result<i64> {
    let t = chrono::NaiveDateTime::parse_from_str(&format!("{hour}:00:00"), "%Y-%m-%dT%H:%M:%S")
        .map_err(|e| anyhow::anyhow!("{flag} {hour:?}: expected YYYY-MM-DDTHH: {e}"))?;
    Ok(t.and_utc().timestamp() / 3600)
}

/// The hour as `YYYY-MM-DDTHH`, the form [`parse_hour`] reads.
pub fn format_hour(hour: i64) -> String {
    chrono::DateTime::from_timestamp(hour * 3600, 0).unwrap_or_default().format("%Y-%m-%dT%H").to_string()
}

fn render(template: &str, topic: &str, hour: i64) -> String {
    let t = chrono::DateTime::from_timestamp(hour * 3600, 0).unwrap_or_default();
    t.format(&template.replace("{topic}", topic)).to_string()
}

/// A template is usable when strftime accepts it and every hour of a year gets its own directory
/// (so it holds the year, the day and the hour).
pub fn check_template(template: &str) -> Result<(), String> {
    if StrftimeItems::new(template).any(|i| matches!(i, Item::Error)) {
        return Err(format!("{template:?}: not a valid strftime pattern"));
    }
    if template.contains("_tron") || template.split('/').any(|s| s.starts_with('_')) {
        return Err(format!("{template:?}: a path part may not start with `_` (reserved for _SUCCESS and _tron)"));
    }
    let base = 494_184; // 2026-05-18T00 in hours since the epoch; any year would do
    let mut seen = HashSet::new();
    for hour in (base - 24 * 366)..base + 24 * 400 {
        if !seen.insert(render(template, "t", hour)) {
            return Err(format!(
                "{template:?}: two hours map to the same directory; include %Y, %m, %d (or %j) and %H"
            ));
        }
    }
    Ok(())
}

/// Different topics must not share an hour directory (each has its own `_SUCCESS`).
pub fn check_distinct(layout: &Layout, topics: &[String]) -> Result<(), String> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for topic in topics {
        let dir = layout.hour_dir(topic, 0);
        if let Some(other) = seen.insert(dir.clone(), topic) {
            return Err(format!("topics {other:?} and {topic:?} would share {dir}; use {{topic}} in the template"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_read_and_print_the_same() {
        assert_eq!(parse_hour("--hour", "2026-05-18T03").unwrap(), 494_187);
        assert_eq!(format_hour(494_187), "2026-05-18T03");
        assert!(parse_hour("--from", "2026-05-18 03").unwrap_err().to_string().contains("--from"));
    }

    #[test]
    fn default_is_hive_style_under_the_prefix() {
        let layout = Layout::new("w", DEFAULT_TEMPLATE, &BTreeMap::new());
        assert_eq!(layout.hour_dir("logs", 494_187), "w/logs/dt=2026-05-18/hr=03/");
        assert_eq!(layout.hive_base("logs").as_deref(), Some("w/logs"));
    }

    #[test]
    fn a_topic_can_have_its_own_template() {
        let per_topic = BTreeMap::from([("web".to_string(), "web-archive/%Y/%m/%d/%H".to_string())]);
        let layout = Layout::new("", DEFAULT_TEMPLATE, &per_topic);
        assert_eq!(layout.hour_dir("web", 494_187), "web-archive/2026/05/18/03/");
        assert_eq!(layout.hive_base("web"), None);
        assert_eq!(layout.hour_dir("app", 494_187), "app/dt=2026-05-18/hr=03/");
    }

    #[test]
    fn templates_must_separate_hours_and_topics() {
        assert!(check_template(DEFAULT_TEMPLATE).is_ok());
        assert!(check_template("{topic}/%Y/%j/%H").is_ok());
        assert!(check_template("{topic}/%Y-%m-%d").unwrap_err().contains("two hours map"));
        assert!(check_template("{topic}/%Q").unwrap_err().contains("strftime"));
        assert!(check_template("_x/%Y/%m/%d/%H").is_err());
        let layout = Layout::new("", "logs/%Y/%m/%d/%H", &BTreeMap::new());
        assert!(check_distinct(&layout, &["a".into(), "b".into()]).unwrap_err().contains("share"));
    }
}
