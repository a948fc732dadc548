//! The optional shared-key handshake of Forward v1 (HELO → PING → PONG), as fluentd's
//! `<security>` and fluent-bit's `Shared_Key` speak it:
//!
//! - server: `["HELO", {"nonce": n, "auth": user_salt_or_empty, "keepalive": true}]`
//! - client: `["PING", host, key_salt, sha512_hex(key_salt+host+n+key), user, sha512_hex(user_salt+user+password)]`
//! - server: `["PONG", ok, reason, host, sha512_hex(key_salt+server_host+n+key)]`

use crate::error::{malformed, DecodeError};
use crate::time::kind;
use rmpv::Value;
use sha2::{Digest, Sha512};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Helo {
    pub nonce: Vec<u8>,
    /// Empty when the server does not ask for a user name and password.
    pub auth_salt: Vec<u8>,
    pub keepalive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    pub hostname: String,
    pub shared_key_salt: Vec<u8>,
    pub shared_key_digest: String,
    pub username: String,
    pub password_digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    pub auth_result: bool,
    pub reason: String,
    pub hostname: String,
    pub shared_key_digest: String,
}

pub fn shared_key_digest(salt: &[u8], hostname: &str, nonce: &[u8], shared_key: &str) -> String {
    let mut h = Sha512::new();
    h.update(salt);
    h.update(hostname.as_bytes());
    h.update(nonce);
    h.update(shared_key.as_bytes());
    hex::encode(h.finalize())
}

pub fn password_digest(auth_salt: &[u8], username: &str, password: &str) -> String {
    let mut h = Sha512::new();
    h.update(auth_salt);
    h.update(username.as_bytes());
    h.update(password.as_bytes());
    hex::encode(h.finalize())
}

impl Helo {
    pub fn encode(&self) -> Vec<u8> {
        let v = Value::Array(vec![
            "HELO".into(),
            Value::Map(vec![
                ("nonce".into(), Value::String(String::from_utf8_lossy(&self.nonce).into_owned().into())),
                ("auth".into(), Value::String(String::from_utf8_lossy(&self.auth_salt).into_owned().into())),
                ("keepalive".into(), self.keepalive.into()),
            ]),
        ]);
        encode(&v)
    }

    pub fn from_value(v: Value) -> Result<Self, DecodeError> {
        let items = expect_array(v, "HELO", 2)?;
        let Value::Map(opts) = &items[1] else {
            return Err(malformed("HELO options must be a map"));
        };
        let mut helo = Helo { nonce: Vec::new(), auth_salt: Vec::new(), keepalive: false };
        for (k, v) in opts {
            match k.as_str() {
                Some("nonce") => helo.nonce = bytes_of(v)?,
                Some("auth") => helo.auth_salt = bytes_of(v)?,
                Some("keepalive") => helo.keepalive = v.as_bool().unwrap_or(false),
                _ => {}
            }
        }
        Ok(helo)
    }
}

impl Ping {
    /// The client's answer to `helo`. `user` is `(name, password)` when the server asked for it.
    pub fn answer(helo: &Helo, hostname: &str, salt: &[u8], shared_key: &str, user: Option<(&str, &str)>) -> Ping {
        let (username, password_digest) = match user {
            Some((name, password)) if !helo.auth_salt.is_empty() => {
                (name.to_owned(), self::password_digest(&helo.auth_salt, name, password))
            }
            _ => (String::new(), String::new()),
        };
        Ping {
            hostname: hostname.to_owned(),
            shared_key_salt: salt.to_vec(),
            shared_key_digest: shared_key_digest(salt, hostname, &helo.nonce, shared_key),
            username,
            password_digest,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(&Value::Array(vec![
            "PING".into(),
            self.hostname.as_str().into(),
            Value::String(String::from_utf8_lossy(&self.shared_key_salt).into_owned().into()),
            self.shared_key_digest.as_str().into(),
            self.username.as_str().into(),
            self.password_digest.as_str().into(),
        ]))
    }

    pub(crate) fn from_items(items: Vec<Value>) -> Result<Self, DecodeError> {
        Ok(Ping {
            hostname: string_of(&items[1], "PING hostname")?,
            shared_key_salt: bytes_of(&items[2])?,
            shared_key_digest: string_of(&items[3], "PING shared key digest")?,
            username: string_of(&items[4], "PING username")?,
            password_digest: string_of(&items[5], "PING password digest")?,
        })
    }

    /// The server's verdict: `Err(reason)` is what goes into a failed PONG.
    pub fn verify(&self, helo: &Helo, shared_key: &str, users: &[(String, String)]) -> Result<(), String> {
        let expected = shared_key_digest(&self.shared_key_salt, &self.hostname, &helo.nonce, shared_key);
        if !constant_time_eq(expected.as_bytes(), self.shared_key_digest.as_bytes()) {
            return Err("shared_key mismatch".into());
        }
        if !helo.auth_salt.is_empty() {
            let ok = users.iter().any(|(name, password)| {
                name == &self.username
                    && constant_time_eq(
                        password_digest(&helo.auth_salt, name, password).as_bytes(),
                        self.password_digest.as_bytes(),
                    )
            });
            if !ok {
                return Err("username/password mismatch".into());
            }
        }
        Ok(())
    }
}

impl Pong {
    pub fn accept(ping: &Ping, helo: &Helo, server_hostname: &str, shared_key: &str) -> Pong {
        Pong {
            auth_result: true,
            reason: String::new(),
            hostname: server_hostname.to_owned(),
            shared_key_digest: shared_key_digest(&ping.shared_key_salt, server_hostname, &helo.nonce, shared_key),
        }
    }

    pub fn reject(reason: &str) -> Pong {
        Pong {
            auth_result: false,
            reason: reason.to_owned(),
            hostname: String::new(),
            shared_key_digest: String::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(&Value::Array(vec![
            "PONG".into(),
            self.auth_result.into(),
            self.reason.as_str().into(),
            self.hostname.as_str().into(),
            self.shared_key_digest.as_str().into(),
        ]))
    }

    pub fn from_value(v: Value) -> Result<Self, DecodeError> {
        let items = expect_array(v, "PONG", 5)?;
        Ok(Pong {
            auth_result: items[1].as_bool().ok_or_else(|| malformed("PONG auth result must be a boolean"))?,
            reason: string_of(&items[2], "PONG reason")?,
            hostname: string_of(&items[3], "PONG hostname")?,
            shared_key_digest: string_of(&items[4], "PONG digest")?,
        })
    }

    /// The client's check that the server knows the shared key too.
    pub fn verify(&self, ping: &Ping, helo: &Helo, shared_key: &str) -> Result<(), String> {
        if !self.auth_result {
            return Err(format!("server refused the handshake: {}", self.reason));
        }
        let expected = shared_key_digest(&ping.shared_key_salt, &self.hostname, &helo.nonce, shared_key);
        if !constant_time_eq(expected.as_bytes(), self.shared_key_digest.as_bytes()) {
            return Err("server's shared key digest does not match ours".into());
        }
        Ok(())
    }
}

fn expect_array(v: Value, name: &str, len: usize) -> Result<Vec<Value>, DecodeError> {
    match v {
        Value::Array(items) if items.len() == len && items[0].as_str() == Some(name) => Ok(items),
        other => Err(malformed(format!("expected [\"{name}\", ...] of {len} elements, got {}", kind(&other)))),
    }
}

fn bytes_of(v: &Value) -> Result<Vec<u8>, DecodeError> {
    match v {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Binary(b) => Ok(b.clone()),
        Value::Nil => Ok(Vec::new()),
        other => Err(malformed(format!("expected a string or binary, got {}", kind(other)))),
    }
}

fn string_of(v: &Value, what: &str) -> Result<String, DecodeError> {
    match v {
        Value::String(s) => Ok(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Value::Binary(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::Nil => Ok(String::new()),
        other => Err(malformed(format!("{what} must be a string, got {}", kind(other)))),
    }
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("writing to a Vec cannot fail");
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helo(auth: &[u8]) -> Helo {
        Helo { nonce: b"0123456789abcdef".to_vec(), auth_salt: auth.to_vec(), keepalive: true }
    }

    #[test]
    fn shared_key_round_trip() {
        let helo = helo(b"");
        let decoded = Helo::from_value(rmpv::decode::read_value(&mut &helo.encode()[..]).unwrap()).unwrap();
        assert_eq!(decoded, helo);
        let ping = Ping::answer(&helo, "app-1", b"salt", "secret", None);
        assert_eq!(ping.verify(&helo, "secret", &[]), Ok(()));
        assert_eq!(ping.verify(&helo, "other", &[]), Err("shared_key mismatch".into()));
        let pong = Pong::accept(&ping, &helo, "relay", "secret");
        let pong = Pong::from_value(rmpv::decode::read_value(&mut &pong.encode()[..]).unwrap()).unwrap();
        assert_eq!(pong.verify(&ping, &helo, "secret"), Ok(()));
        assert!(pong.verify(&ping, &helo, "wrong").is_err());
    }

    #[test]
    fn users_are_checked_when_the_server_asks() {
        let helo = helo(b"usersalt");
        let users = vec![("alice".to_owned(), "pw".to_owned())];
        let good = Ping::answer(&helo, "h", b"s", "k", Some(("alice", "pw")));
        assert_eq!(good.verify(&helo, "k", &users), Ok(()));
        let bad = Ping::answer(&helo, "h", b"s", "k", Some(("alice", "nope")));
        assert_eq!(bad.verify(&helo, "k", &users), Err("username/password mismatch".into()));
    }

    #[test]
    fn digest_matches_fluentd_formula() {
        // Computed independently: hashlib.sha512(b"salthostnoncekey").hexdigest()
        assert_eq!(
            shared_key_digest(b"salt", "host", b"nonce", "key"),
            "22ec4f9c36a2f046a7b4655800a5ddfb182586919b3cd9677fdec97a04c86982043491985b89d8ad2ca716289d8daf1521a9bd98ef009f54d9db291d83284e98"
        );
    }
}
