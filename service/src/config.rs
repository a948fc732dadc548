//! Loads one TOML file into a typed config. Unknown keys and bad values fail with the key's path
//! (`destinations.s3.bucket`), what was wrong, and the file; `${NAME}` is replaced by the
//! environment variable NAME so secrets stay out of the file.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: ${{{var}}} is used but the environment variable {var} is not set")]
    MissingEnv { path: PathBuf, var: String },
    #[error("{path}: key `{key}`: {message}")]
    Invalid { path: PathBuf, key: String, message: String },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
}

/// Reads, expands and parses `path`; `validate` adds checks serde cannot express and returns
/// `(key path, message)` for the first problem.
pub fn load<T, F>(path: &Path, validate: F) -> Result<T, ConfigError>
where
    T: DeserializeOwned,
    F: FnOnce(&T) -> Result<(), (String, String)>,
{
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse(&text, path, validate)
}

pub fn parse<T, F>(text: &str, path: &Path, validate: F) -> Result<T, ConfigError>
where
    T: DeserializeOwned,
    F: FnOnce(&T) -> Result<(), (String, String)>,
{
    let mut doc: toml::Value = toml::from_str(text)
        .map_err(|e| ConfigError::Syntax { path: path.into(), message: e.to_string().trim().into() })?;
    // Only string values are expanded, so a `${…}` in a comment is left alone.
    expand_strings(&mut doc, &|name| std::env::var(name).ok())
        .map_err(|var| ConfigError::MissingEnv { path: path.into(), var })?;
    read_secret_files(&mut doc, "").map_err(|(key, message)| ConfigError::Invalid {
        path: path.into(),
        key,
        message,
    })?;
    let value: T = serde_path_to_error::deserialize(doc).map_err(|e| ConfigError::Invalid {
        path: path.into(),
        key: e.path().to_string(),
        message: with_suggestion(first_line(&e.inner().to_string())),
    })?;
    validate(&value).map_err(|(key, message)| ConfigError::Invalid { path: path.into(), key, message })?;
    Ok(value)
}

/// Keys whose value may instead be read from a file named by `{key}_file` (for systemd
/// `LoadCredential=`, or any file only the service can read): a secret in the configuration file,
/// or in an `Environment=` line, is visible to every local user through `systemctl show`.
/// The dotted ones are librdkafka properties in `[kafka.properties]` (`"sasl.password_file" = …`).
pub const SECRET_KEYS: &[&str] =
    &["shared_key", "password", "sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret"];

/// Replaces every `{key}_file = "PATH"` (for the keys in [`SECRET_KEYS`]) by `{key}` = the file's
/// contents without a trailing newline. Err: the key's path and the problem.
fn read_secret_files(v: &mut toml::Value, at: &str) -> Result<(), (String, String)> {
    let join = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
    match v {
        toml::Value::Table(t) => {
            for key in SECRET_KEYS {
                let file_key = format!("{key}_file");
                let Some(value) = t.remove(&file_key) else { continue };
                let Some(file) = value.as_str() else {
                    return Err((join(&file_key), "must be a path (a string)".into()));
                };
                if t.contains_key(*key) {
                    return Err((join(&file_key), format!("set either `{key}` or `{file_key}`, not both")));
                }
                let secret =
                    std::fs::read_to_string(file).map_err(|e| (join(&file_key), format!("cannot read {file}: {e}")))?;
                let secret = secret.strip_suffix('\n').unwrap_or(&secret);
                let secret = secret.strip_suffix('\r').unwrap_or(secret);
                if secret.is_empty() {
                    return Err((join(&file_key), format!("{file} is empty")));
                }
                t.insert(key.to_string(), toml::Value::String(secret.to_string()));
            }
            for (k, child) in t.iter_mut() {
                read_secret_files(child, &join(k))?;
            }
        }
        toml::Value::Array(items) => {
            for (i, child) in items.iter_mut().enumerate() {
                read_secret_files(child, &format!("{at}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_strings(v: &mut toml::Value, lookup: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    match v {
        toml::Value::String(s) if s.contains('$') => *s = expand_env(s, lookup)?,
        toml::Value::Array(items) => items.iter_mut().try_for_each(|i| expand_strings(i, lookup))?,
        toml::Value::Table(t) => t.iter_mut().try_for_each(|(_, i)| expand_strings(i, lookup))?,
        _ => {}
    }
    Ok(())
}

/// serde names an unknown key and every key it expected (`unknown field `sizee`, expected one of
/// `size`, `wait``); a typo is easier to fix when the closest expected key is spelled out.
fn with_suggestion(message: String) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message;
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message;
    };
    let closest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|candidate| (strsim::damerau_levenshtein(unknown, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= (candidate.len().max(unknown.len()) / 3).max(1))
        .min();
    match closest {
        Some((_, candidate)) => format!("{message}; did you mean `{candidate}`?"),
        None => message,
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().trim().to_string()
}

/// Replaces `${NAME}`; `$${` stays a literal `${`. Returns the first unset name as the error.
pub fn expand_env(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(stripped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = stripped;
        } else if let (true, Some(end)) = (after.starts_with("${"), after.find('}')) {
            let name = &after[2..end];
            out.push_str(&lookup(name).ok_or_else(|| name.to_string())?);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses durations written as `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 5m, 1h"))?;
    let ms = match unit {
        "ms" => n,
        "s" | "" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return Err(format!("invalid duration {s:?}: unit must be ms, s, m, h or d")),
    };
    Ok(std::time::Duration::from_millis(ms))
}

/// Serde adapter for duration fields: `#[serde(with = "tron_service::config::duration")]`.
pub mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Top {
        name: String,
        inner: Inner,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: u32,
        #[serde(default, with = "duration")]
        wait: std::time::Duration,
    }

    fn parse_top(text: &str) -> Result<Top, ConfigError> {
        parse(text, Path::new("/etc/tron/x.toml"), |_: &Top| Ok(()))
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct WithSecrets {
        security: Security,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Security {
        shared_key: String,
        users: Vec<User>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct User {
        password: String,
    }

    #[test]
    fn secrets_come_from_files_and_problems_name_the_key() {
        let dir = std::env::temp_dir().join(format!("tron-secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "s3cret\n").unwrap();
        let text = format!(
            "[security]\nshared_key_file = '{}'\n[[security.users]]\npassword_file = '{}'\n",
            key.display(),
            key.display()
        );
        let cfg: WithSecrets = parse(&text, Path::new("/x.toml"), |_: &WithSecrets| Ok(())).unwrap();
        assert_eq!(cfg.security.shared_key, "s3cret");
        assert_eq!(cfg.security.users[0].password, "s3cret");

        let both = format!("[security]\nshared_key = 'a'\nshared_key_file = '{}'\nusers = []\n", key.display());
        let msg = parse(&both, Path::new("/x.toml"), |_: &WithSecrets| Ok(())).unwrap_err().to_string();
        assert!(msg.contains("key `security.shared_key_file`: set either `shared_key` or `shared_key_file`"), "{msg}");

        let missing = "[security]\nusers = [{ password_file = '/nonexistent/pw' }]\nshared_key = 'a'\n";
        let msg = parse(missing, Path::new("/x.toml"), |_: &WithSecrets| Ok(())).unwrap_err().to_string();
        assert!(msg.contains("key `security.users[0].password_file`: cannot read /nonexistent/pw"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_kafka_sasl_password_comes_from_a_file() {
        #[derive(serde::Deserialize)]
        struct K {
            kafka: KafkaProps,
        }
        #[derive(serde::Deserialize)]
        struct KafkaProps {
            properties: std::collections::BTreeMap<String, String>,
        }
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("kafka-password");
        std::fs::write(&pw, "hunter2\n").unwrap();
        let text =
            format!("[kafka.properties]\n\"sasl.username\" = 'u'\n\"sasl.password_file\" = '{}'\n", pw.display());
        let cfg: K = parse(&text, Path::new("/x.toml"), |_: &K| Ok(())).unwrap();
        assert_eq!(cfg.kafka.properties["sasl.password"], "hunter2");
        assert!(!cfg.kafka.properties.contains_key("sasl.password_file"));
    }

    #[test]
    fn unknown_key_names_its_path() {
        let err = parse_top("name = 'a'\n[inner]\nsize = 1\nsizee = 2\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/tron/x.toml: key `inner.sizee`: unknown field `sizee`"), "{msg}");
    }

    #[test]
    fn near_miss_key_gets_a_suggestion() {
        let err = parse_top("name = 'a'\n[inner]\nsize = 1\nwiat = '1s'\n").unwrap_err().to_string();
        assert!(err.ends_with("expected `size` or `wait`; did you mean `wait`?"), "{err}");
        let err = parse_top("name = 'a'\n[inner]\nsize = 1\ncolour = 2\n").unwrap_err().to_string();
        assert!(!err.contains("did you mean"), "{err}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let err = parse_top("name = 'a'\n[inner]\nsize = 'big'\n").unwrap_err();
        assert!(err.to_string().contains("key `inner.size`: invalid type: string \"big\", expected u32"), "{err}");
    }

    #[test]
    fn bad_duration_names_its_path() {
        let err = parse_top("name = 'a'\n[inner]\nsize = 1\nwait = '5 parsecs'\n").unwrap_err();
        assert!(err.to_string().contains("key `inner.wait`: invalid duration"), "{err}");
    }

    #[test]
    fn env_expansion() {
        let env = |n: &str| (n == "KEY").then(|| "s3cr3t".to_string());
        assert_eq!(expand_env("k = \"${KEY}\" $${KEY} $5", &env).unwrap(), "k = \"s3cr3t\" ${KEY} $5");
        assert_eq!(expand_env("${NOPE}", &env).unwrap_err(), "NOPE");
    }

    #[test]
    fn env_in_comments_is_ignored_and_in_strings_expanded() {
        std::env::set_var("TRON_TEST_SECRET", "xyz");
        let top: Top = parse(
            "# uses ${NOT_SET}\nname = '${TRON_TEST_SECRET}'\n[inner]\nsize = 1\n",
            Path::new("c.toml"),
            |_: &Top| Ok(()),
        )
        .unwrap();
        assert_eq!(top.name, "xyz");
        let err = parse_top("name = '${TRON_NOT_SET_ANYWHERE}'\n[inner]\nsize = 1\n").unwrap_err();
        assert!(err.to_string().contains("TRON_NOT_SET_ANYWHERE is not set"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert!(parse_duration("2 weeks").is_err());
    }
}
