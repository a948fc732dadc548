//! Checks a librdkafka client configuration the way the daemon will use it, so that
//! `--check-config` (and every start) fails on a value librdkafka refuses, naming the key in our
//! file, instead of a running daemon failing later or a check that says "valid" for a file the
//! daemon cannot start with (an unsupported compression, a security protocol, a missing CA file).

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use std::collections::BTreeMap;

/// Which librdkafka property each typed key of our file sets (`("compression.type",
/// "kafka.compression")`): an error on it names the key the user wrote.
pub type TypedKeys<'a> = &'a [(&'a str, &'a str)];

/// Creates the client (a producer's or consumer's configuration, with `properties` applied last)
/// and drops it. Err: (key in our file, librdkafka's message).
pub fn check<C: rdkafka::config::FromClientConfig>(
    client: &ClientConfig,
    section: &str,
    properties: &BTreeMap<String, String>,
    typed: TypedKeys,
) -> Result<(), (String, String)> {
    // The check must not reach for the brokers: --check-config runs where they may not resolve
    // (a build host, ExecStartPre before the network), and its log would then be errors about
    // a configuration that is valid.
    let mut offline = client.clone();
    offline.set("bootstrap.servers", "").set_log_level(rdkafka::config::RDKafkaLogLevel::Error);
    match offline.create::<C>() {
        Ok(_) => Ok(()),
        Err(e) => Err(describe(&e, section, properties, typed)),
    }
}

fn describe(
    e: &KafkaError,
    section: &str,
    properties: &BTreeMap<String, String>,
    typed: TypedKeys,
) -> (String, String) {
    match e {
        KafkaError::ClientConfig(_, message, property, _) => {
            (key_for(property, section, properties, typed), message.clone())
        }
        // rd_kafka_new's own checks (files named by ssl.*, SASL settings that do not fit together)
        // name librdkafka's property in the message; point at the section where it is set.
        KafkaError::ClientCreation(message) => {
            let key = properties
                .keys()
                .find(|k| message.contains(k.as_str()))
                .map(|k| property_key(section, k))
                .unwrap_or_else(|| format!("{section}.properties"));
            (key, format!("librdkafka refuses the client configuration: {message}"))
        }
        other => (format!("{section}.properties"), other.to_string()),
    }
}

fn key_for(property: &str, section: &str, properties: &BTreeMap<String, String>, typed: TypedKeys) -> String {
    if properties.contains_key(property) {
        return property_key(section, property);
    }
    match typed.iter().find(|(p, _)| *p == property) {
        Some((_, ours)) => ours.to_string(),
        None => format!("{section} (librdkafka property `{property}`)"),
    }
}

fn property_key(section: &str, property: &str) -> String {
    format!("{section}.properties.\"{property}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::BaseProducer;

    fn client(props: &[(&str, &str)]) -> (ClientConfig, BTreeMap<String, String>) {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", "127.0.0.1:1").set("compression.type", "zstd");
        let map: BTreeMap<String, String> = props.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        for (k, v) in &map {
            c.set(k, v);
        }
        (c, map)
    }

    const TYPED: TypedKeys = &[("compression.type", "kafka.compression")];

    #[test]
    fn tls_scram_plain_and_zstd_are_built_in() {
        let (c, map) = client(&[
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "u"),
            ("sasl.password", "p"),
        ]);
        check::<BaseProducer>(&c, "kafka", &map, TYPED).expect("ssl, SCRAM and zstd are compiled in");
        let (c, map) = client(&[
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.username", "u"),
            ("sasl.password", "p"),
        ]);
        check::<BaseProducer>(&c, "kafka", &map, TYPED).expect("PLAIN is compiled in");
    }

    #[test]
    fn a_refused_value_names_our_key() {
        let (c, map) = client(&[("security.protocol", "carrier_pigeon")]);
        let (key, message) = check::<BaseProducer>(&c, "kafka", &map, TYPED).unwrap_err();
        assert_eq!(key, "kafka.properties.\"security.protocol\"");
        assert!(message.contains("carrier_pigeon"), "{message}");

        let mut c = ClientConfig::new();
        c.set("compression.type", "brotli");
        let (key, _) = check::<BaseProducer>(&c, "kafka", &BTreeMap::new(), TYPED).unwrap_err();
        assert_eq!(key, "kafka.compression");
    }

    #[test]
    fn a_missing_ca_file_is_caught_before_the_daemon_runs() {
        let (c, map) = client(&[("security.protocol", "ssl"), ("ssl.ca.location", "/nonexistent/ca.pem")]);
        let (key, message) = check::<BaseProducer>(&c, "kafka", &map, TYPED).unwrap_err();
        assert_eq!(key, "kafka.properties.\"ssl.ca.location\"", "{message}");
    }
}
