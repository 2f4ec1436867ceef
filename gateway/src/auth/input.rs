//! Validated registration input ("parse, don't validate"): an [`Email`], [`Password`]
//! or [`DisplayName`] that exists satisfies its rules. Each `parse` returns the message
//! a 422 shows for its field.

use secrecy::{ExposeSecret, SecretString};

/// Fewest characters in a password.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Most characters in a password (bounds the hashing work a request can ask for).
pub const MAX_PASSWORD_CHARS: usize = 1024;
/// Most characters in a display name.
pub const MAX_DISPLAY_NAME_CHARS: usize = 100;
/// Most characters in an email address (RFC 5321's path limit, less the brackets).
const MAX_EMAIL_CHARS: usize = 254;
/// Most characters in an email address's local part (RFC 5321).
const MAX_LOCAL_PART_CHARS: usize = 64;

/// An email address, trimmed and lower-cased: what is stored and looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Accepts `local@domain.tld`: one `@`, a local part of at most 64 characters, a
    /// domain of dot-separated non-empty labels (at least two), no spaces or control
    /// characters. Deliberately simple: deliverability is not checked here.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        const SHAPE: &str = "must be an email address like name@example.com";
        let email = Self::normalize(raw);
        if email.chars().count() > MAX_EMAIL_CHARS {
            return Err("must be at most 254 characters");
        }
        if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SHAPE);
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(SHAPE);
        };
        let labels: Vec<&str> = domain.split('.').collect();
        let valid = !local.is_empty()
            && local.chars().count() <= MAX_LOCAL_PART_CHARS
            && !domain.contains('@')
            && labels.len() >= 2
            && labels
                .iter()
                .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
        if valid { Ok(Self(email)) } else { Err(SHAPE) }
    }

    /// The form an email is stored and looked up in (login does not validate: an
    /// address that cannot exist simply matches no account).
    pub fn normalize(raw: &str) -> String {
        raw.trim().to_lowercase()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password of 8 to 1024 characters (Unicode scalar values), kept secret.
#[derive(Debug, Clone)]
pub struct Password(SecretString);

impl Password {
    pub fn parse(raw: SecretString) -> Result<Self, &'static str> {
        let chars = raw.expose_secret().chars().count();
        if chars < MIN_PASSWORD_CHARS {
            Err("must be at least 8 characters")
        } else if chars > MAX_PASSWORD_CHARS {
            Err("must be at most 1024 characters")
        } else {
            Ok(Self(raw))
        }
    }

    pub fn into_secret(self) -> SecretString {
        self.0
    }
}

/// Whether a password presented at login could be valid at all (login hashes it only
/// then, but does the same work either way).
pub fn plausible_password(raw: &SecretString) -> bool {
    raw.expose_secret().chars().count() <= MAX_PASSWORD_CHARS
}

/// A display name: trimmed, 1 to 100 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let name = raw.trim();
        if name.is_empty() {
            Err("must not be blank (omit it instead)")
        } else if name.chars().count() > MAX_DISPLAY_NAME_CHARS {
            Err("must be at most 100 characters")
        } else if name.chars().any(char::is_control) {
            Err("must not contain control characters")
        } else {
            Ok(Self(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_lower_cased_and_trimmed() {
        let email = Email::parse("  Ada.Lovelace@Example.COM ").unwrap();
        assert_eq!(email.as_str(), "ada.lovelace@example.com");
    }

    #[test]
    fn malformed_emails_are_refused() {
        for raw in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "ada@@example.com",
            "ada@exa mple.com",
            "ada@example..com",
            "ada@-example.com",
            "a\u{0}b@example.com",
        ] {
            assert!(Email::parse(raw).is_err(), "{raw:?}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(Email::parse(&long_local).is_err());
    }

    #[test]
    fn passwords_are_8_to_1024_characters() {
        let p = |s: String| Password::parse(SecretString::from(s));
        assert!(p("a".repeat(7)).is_err());
        assert!(p("a".repeat(8)).is_ok());
        assert!(p("é".repeat(1024)).is_ok(), "characters, not bytes");
        assert!(p("a".repeat(1025)).is_err());
    }

    #[test]
    fn display_names_are_bounded_and_printable() {
        assert_eq!(DisplayName::parse(" Ada ").unwrap().as_str(), "Ada");
        assert!(DisplayName::parse("   ").is_err());
        assert!(DisplayName::parse(&"x".repeat(101)).is_err());
        assert!(DisplayName::parse(&"x".repeat(100)).is_ok());
        assert!(DisplayName::parse("Ada\u{7}").is_err());
        assert!(DisplayName::parse("A\nda").is_err());
    }
}
