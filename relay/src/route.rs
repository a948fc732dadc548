//! Tag → topic routing with fluentd's match patterns: parts split on `.`, `*` matches exactly one
//! part, `**` matches zero or more parts, `{a,b}` matches either alternative.

#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(Vec<String>, String)>,
    default_topic: String,
}

impl Router {
    pub fn new(routes: impl IntoIterator<Item = (String, String)>, default_topic: String) -> Self {
        Router {
            routes: routes.into_iter().map(|(p, t)| (p.split('.').map(str::to_owned).collect(), t)).collect(),
            default_topic,
        }
    }

    /// First matching route wins; a tag no route matches goes to the default topic, never dropped.
    pub fn topic(&self, tag: &str) -> &str {
        let parts: Vec<&str> = tag.split('.').collect();
        self.routes
            .iter()
            .find(|(pattern, _)| matches(pattern, &parts))
            .map_or(self.default_topic.as_str(), |(_, topic)| topic.as_str())
    }
}

fn matches(pattern: &[String], tag: &[&str]) -> bool {
    match pattern.split_first() {
        None => tag.is_empty(),
        Some((p, rest)) if p == "**" => (0..=tag.len()).any(|skip| matches(rest, &tag[skip..])),
        Some((p, rest)) => match tag.split_first() {
            Some((t, tag_rest)) => part_matches(p, t) && matches(rest, tag_rest),
            None => false,
        },
    }
}

fn part_matches(pattern: &str, part: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(alts) = pattern.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
        return alts.split(',').any(|a| a == part);
    }
    pattern == part
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new(
            [
                ("nginx.*".to_string(), "web".to_string()),
                ("app.**".to_string(), "apps".to_string()),
                ("{db,cache}.slow".to_string(), "slow".to_string()),
            ],
            "logs".into(),
        )
    }

    #[test]
    fn first_match_wins_and_unknown_goes_to_default() {
        let r = router();
        assert_eq!(r.topic("nginx.access"), "web");
        assert_eq!(r.topic("nginx.access.extra"), "logs");
        assert_eq!(r.topic("app"), "apps");
        assert_eq!(r.topic("app.a.b.c"), "apps");
        assert_eq!(r.topic("cache.slow"), "slow");
        assert_eq!(r.topic("db.fast"), "logs");
        assert_eq!(r.topic(""), "logs");
    }
}
