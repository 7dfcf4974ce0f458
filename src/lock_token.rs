//! Lock tokens: the lease a receiver holds on a C2D message or a feedback batch until it settles it.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// A lock token as the hub issues it (a random UUID) and a receiver hands it back (bare, or quoted as in the
/// `ETag` it came in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockToken(pub Uuid);

impl LockToken {
    pub fn new() -> LockToken {
        LockToken(Uuid::new_v4())
    }
}

impl Default for LockToken {
    fn default() -> Self {
        LockToken::new()
    }
}

/// Text that is no lock token this hub could have issued.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("not a lock token")]
pub struct NotALockToken;

impl FromStr for LockToken {
    type Err = NotALockToken;
    fn from_str(text: &str) -> Result<LockToken, NotALockToken> {
        Uuid::parse_str(text.trim().trim_matches('"'))
            .map(LockToken)
            .map_err(|_| NotALockToken)
    }
}

impl fmt::Display for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::LockToken;

    #[test]
    fn bare_and_quoted_tokens_parse() {
        let token = LockToken::new();
        assert_eq!(token.to_string().parse::<LockToken>().unwrap(), token);
        assert_eq!(format!("\"{token}\"").parse::<LockToken>().unwrap(), token);
        assert!("not-a-token".parse::<LockToken>().is_err());
    }
}
