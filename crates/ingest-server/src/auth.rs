//! Class attribution: which class a request's events belong to.

use std::collections::HashMap;

use cellmon_domain::lms::ClassId;
use cellmon_store::classes::token_digest as digest;
use secrecy::ExposeSecret as _;

use crate::config::Config;

/// Ingest tokens, kept only as SHA-256 digests: a lookup by digest takes
/// the same time whatever the token, and a memory dump shows no tokens.
#[derive(Debug, Clone)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], ClassId>,
    open_class: Option<ClassId>,
}

impl Tokens {
    pub fn from_config(config: &Config) -> Self {
        Self {
            by_digest: config
                .classes
                .iter()
                .map(|c| (digest(c.token.expose_secret()), c.class_id))
                .collect(),
            open_class: config.open_class,
        }
    }

    /// The class for a presented token, or for none in open mode.
    pub fn class_for(&self, token: Option<&str>) -> Option<ClassId> {
        match token {
            Some(token) => self.by_digest.get(&digest(token)).copied(),
            None => self.open_class,
        }
    }
}
