//! API keys: each bearer key names one tenant. The file has one `<tenant> <key>` per line
//! (`#` starts a comment). Keys are held only as SHA-256 digests, so a lookup compares
//! digests: how long it takes says nothing about how much of a key a guess got right.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Shortest API key accepted: 16 characters.
pub const MIN_KEY_CHARS: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeysError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("line {line}: expected `<tenant> <key>`")]
    Malformed { line: usize },
    #[error("line {line}: {tenant:?} is not a tenant name (1-64 of [A-Za-z0-9_-])")]
    InvalidTenant { line: usize, tenant: String },
    #[error("line {line}: the key is {chars} characters; at least {MIN_KEY_CHARS}")]
    ShortKey { line: usize, chars: usize },
    #[error("line {line}: this key is already given to another line")]
    Duplicate { line: usize },
}

/// API keys by digest, each to its tenant.
#[derive(Clone, Default)]
pub struct ApiKeys {
    by_digest: HashMap<[u8; 32], String>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.by_digest.len())
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    pub fn load(path: &Path) -> Result<ApiKeys, KeysError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KeysError::File { path: path.display().to_string(), reason: e.to_string() })?;
        ApiKeys::parse(&text)
    }

    pub fn parse(text: &str) -> Result<ApiKeys, KeysError> {
        let mut keys = ApiKeys::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let mut words = content.split_whitespace();
            let (Some(tenant), Some(key), None) = (words.next(), words.next(), words.next()) else {
                return Err(KeysError::Malformed { line });
            };
            keys.add(tenant, key).map_err(|e| e.at(line))?;
        }
        Ok(keys)
    }

    /// Gives `key` to `tenant`.
    pub fn add(&mut self, tenant: &str, key: &str) -> Result<(), KeysError> {
        if !sundara_schemas::subjects::is_token(tenant) {
            return Err(KeysError::InvalidTenant { line: 0, tenant: tenant.into() });
        }
        if key.chars().count() < MIN_KEY_CHARS {
            return Err(KeysError::ShortKey { line: 0, chars: key.chars().count() });
        }
        if self.by_digest.insert(digest(key), tenant.to_string()).is_some() {
            return Err(KeysError::Duplicate { line: 0 });
        }
        Ok(())
    }

    /// The tenant `key` belongs to.
    pub fn tenant(&self, key: &str) -> Option<&str> {
        self.by_digest.get(&digest(key)).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

impl KeysError {
    fn at(self, line: usize) -> KeysError {
        match self {
            KeysError::InvalidTenant { tenant, .. } => KeysError::InvalidTenant { line, tenant },
            KeysError::ShortKey { chars, .. } => KeysError::ShortKey { line, chars },
            KeysError::Duplicate { .. } => KeysError::Duplicate { line },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_tenants_and_bad_files_are_refused_by_line() {
        let keys = ApiKeys::parse("# tenants\nacme sk-acme-0123456789abcdef\n\nbob  sk-bob-0123456789abcdef # bob's\n")
            .unwrap();
        assert_eq!(keys.tenant("sk-acme-0123456789abcdef"), Some("acme"));
        assert_eq!(keys.tenant("sk-bob-0123456789abcdef"), Some("bob"));
        assert_eq!(keys.tenant("sk-acme-0123456789abcde"), None);
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)", "keys never show");
        assert_eq!(ApiKeys::parse("acme\n").unwrap_err(), KeysError::Malformed { line: 1 });
        assert_eq!(
            ApiKeys::parse("\na.b sk-0123456789abcdef\n").unwrap_err(),
            KeysError::InvalidTenant { line: 2, tenant: "a.b".into() }
        );
        assert_eq!(ApiKeys::parse("a short\n").unwrap_err(), KeysError::ShortKey { line: 1, chars: 5 });
        let twice = "a sk-0123456789abcdef\nb sk-0123456789abcdef\n";
        assert_eq!(ApiKeys::parse(twice).unwrap_err(), KeysError::Duplicate { line: 2 });
    }
}
