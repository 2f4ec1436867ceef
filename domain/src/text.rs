//! Validated text values ("parse, don't validate").
//!
//! A value of one of these types exists only if it passed its `parse`
//! constructor, so code that holds a [`MessageText`] never re-checks it.
//! Lengths count Unicode scalar values (`char`s), not bytes.
//!
//! NUL (`\0`) is refused everywhere: Postgres `jsonb` cannot store `\u0000`,
//! and a payload the store cannot hold must be refused at the edge (422), not
//! at append time (500).
//!
//! These types are for *commands*. Event payloads hold plain `String`s: events
//! are facts that must always decode, even after a rule changes or a payload
//! is redacted to `""`.
//!
//! User-written types ([`MessageText`], [`AssistantText`], [`Title`],
//! [`SystemPrompt`], [`Instructions`]) print only their length in `Debug`, so a
//! command logged with `?` never leaks what a user wrote.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Most characters in a user message after trimming.
pub const MESSAGE_TEXT_MAX_CHARS: usize = 32_000;
/// Most characters in an assistant reply after trimming (a model may write far
/// more than a user may paste).
pub const ASSISTANT_TEXT_MAX_CHARS: usize = 200_000;
/// Most characters in a conversation title after trimming.
pub const TITLE_MAX_CHARS: usize = 200;
/// Most characters in a system prompt.
pub const SYSTEM_PROMPT_MAX_CHARS: usize = 32_000;
/// Most characters in a model name.
pub const MODEL_NAME_MAX_CHARS: usize = 100;
/// Most characters in a run's extra instructions.
pub const INSTRUCTIONS_MAX_CHARS: usize = 8_000;

/// Which rule a value broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rule {
    /// Empty, or only whitespace.
    #[error("must not be blank")]
    Blank,
    /// More characters than allowed.
    #[error("must be at most {max} characters")]
    TooLong {
        /// The limit, in characters.
        max: usize,
    },
    /// Contains a NUL character.
    #[error("must not contain NUL characters")]
    ContainsNul,
    /// Contains a control character (newline, tab, …).
    #[error("must not contain control characters")]
    ContainsControl,
    /// Contains a character outside the allowed set.
    #[error("may only contain {allowed}")]
    InvalidCharacter {
        /// The allowed characters, for the message.
        allowed: &'static str,
    },
    /// A number outside its range.
    #[error("must be between {min} and {max}")]
    OutOfRange {
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// Looks like a secret where only a label is allowed.
    #[error("must be a label, not a secret")]
    LooksLikeSecret,
}

/// A value that broke a rule. Names the field (as the API spells it, e.g.
/// `text`, `title`, `system_prompt`) and the rule; maps to HTTP 422 with the
/// field in the problem's `errors`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {rule}")]
pub struct ValidationError {
    /// The field, as the API names it.
    pub field: &'static str,
    /// The rule it broke.
    pub rule: Rule,
}

impl ValidationError {
    /// A new error for `field` breaking `rule`.
    #[must_use]
    pub const fn new(field: &'static str, rule: Rule) -> Self {
        Self { field, rule }
    }
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), ValidationError> {
    // Counting stops at max + 1, so a 1 MiB paste costs no more than the limit.
    if s.chars().take(max + 1).count() > max {
        return Err(ValidationError::new(field, Rule::TooLong { max }));
    }
    Ok(())
}

fn check_no_nul(field: &'static str, s: &str) -> Result<(), ValidationError> {
    if s.contains('\0') {
        return Err(ValidationError::new(field, Rule::ContainsNul));
    }
    Ok(())
}

fn check_not_blank(field: &'static str, trimmed: &str) -> Result<(), ValidationError> {
    if trimmed.is_empty() {
        return Err(ValidationError::new(field, Rule::Blank));
    }
    Ok(())
}

macro_rules! text_type {
    ($(#[$meta:meta])* $name:ident, debug = $debug:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The value as a string slice.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The owned string.
            #[must_use]
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValidationError;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ValidationError;

            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::parse(value.to_owned())
            }
        }

        text_type!(@debug $name, $debug);
    };
    (@debug $name:ident, redacted) => {
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(<{} chars>)", stringify!($name), self.0.chars().count())
            }
        }
    };
    (@debug $name:ident, plain) => {
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_type!(
    /// What a user wrote in a message.
    ///
    /// Valid when, after trimming whitespace, it has 1 to 32,000 characters
    /// and contains no NUL. The value is kept **as given** (untrimmed), so
    /// HTML, emoji, SQL-looking text and surrounding whitespace round-trip
    /// byte for byte.
    MessageText,
    debug = redacted
);

impl MessageText {
    /// Validates a user message.
    ///
    /// # Errors
    /// `text` is blank, over [`MESSAGE_TEXT_MAX_CHARS`] after trimming, or
    /// contains NUL.
    pub fn parse(text: String) -> Result<Self, ValidationError> {
        const FIELD: &str = "text";
        let trimmed = text.trim();
        check_not_blank(FIELD, trimmed)?;
        check_len(FIELD, trimmed, MESSAGE_TEXT_MAX_CHARS)?;
        check_no_nul(FIELD, &text)?;
        Ok(Self(text))
    }
}

text_type!(
    /// What the agent replied.
    ///
    /// Like [`MessageText`] but with a larger limit, 200,000 characters after
    /// trimming, because a model's answer is not bounded by what a user may
    /// paste. Kept as given. An agent whose model produced NUL characters
    /// should strip them before parsing.
    AssistantText,
    debug = redacted
);

impl AssistantText {
    /// Validates an assistant reply.
    ///
    /// # Errors
    /// `text` is blank, over [`ASSISTANT_TEXT_MAX_CHARS`] after trimming, or
    /// contains NUL.
    pub fn parse(text: String) -> Result<Self, ValidationError> {
        const FIELD: &str = "text";
        let trimmed = text.trim();
        check_not_blank(FIELD, trimmed)?;
        check_len(FIELD, trimmed, ASSISTANT_TEXT_MAX_CHARS)?;
        check_no_nul(FIELD, &text)?;
        Ok(Self(text))
    }
}

text_type!(
    /// A conversation title: 1 to 200 characters after trimming, no control
    /// characters (so no newlines or tabs). Stored **trimmed**: surrounding
    /// whitespace in a one-line label carries no meaning.
    Title,
    debug = redacted
);

impl Title {
    /// Validates and trims a title.
    ///
    /// # Errors
    /// `title` is blank, over [`TITLE_MAX_CHARS`] after trimming, or contains
    /// a control character.
    pub fn parse(title: String) -> Result<Self, ValidationError> {
        const FIELD: &str = "title";
        let trimmed = title.trim();
        check_not_blank(FIELD, trimmed)?;
        check_len(FIELD, trimmed, TITLE_MAX_CHARS)?;
        if trimmed.chars().any(char::is_control) {
            return Err(ValidationError::new(FIELD, Rule::ContainsControl));
        }
        if trimmed.len() == title.len() {
            Ok(Self(title))
        } else {
            Ok(Self(trimmed.to_owned()))
        }
    }
}

text_type!(
    /// A conversation's system prompt: 0 to 32,000 characters, no NUL. Kept as
    /// given; may be empty.
    SystemPrompt,
    debug = redacted
);

impl SystemPrompt {
    /// Validates a system prompt.
    ///
    /// # Errors
    /// `prompt` is over [`SYSTEM_PROMPT_MAX_CHARS`] or contains NUL.
    pub fn parse(prompt: String) -> Result<Self, ValidationError> {
        const FIELD: &str = "system_prompt";
        check_len(FIELD, &prompt, SYSTEM_PROMPT_MAX_CHARS)?;
        check_no_nul(FIELD, &prompt)?;
        Ok(Self(prompt))
    }
}

text_type!(
    /// A model name such as `gemini-2.5-flash`: 1 to 100 characters of
    /// `[A-Za-z0-9._-]`.
    ModelName,
    debug = plain
);

impl ModelName {
    /// Validates a model name.
    ///
    /// # Errors
    /// `name` is empty, over [`MODEL_NAME_MAX_CHARS`], or has a character
    /// outside `[A-Za-z0-9._-]`.
    pub fn parse(name: String) -> Result<Self, ValidationError> {
        const FIELD: &str = "model";
        if name.is_empty() {
            return Err(ValidationError::new(FIELD, Rule::Blank));
        }
        check_len(FIELD, &name, MODEL_NAME_MAX_CHARS)?;
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(ValidationError::new(
                FIELD,
                Rule::InvalidCharacter {
                    allowed: "letters, digits, '.', '_' and '-'",
                },
            ));
        }
        Ok(Self(name))
    }
}

text_type!(
    /// Extra instructions for one run, appended to the system prompt: at most
    /// 8,000 characters, no NUL. Kept as given; may be empty.
    Instructions,
    debug = redacted
);

impl Instructions {
    /// Validates run instructions.
    ///
    /// # Errors
    /// `instructions` is over [`INSTRUCTIONS_MAX_CHARS`] or contains NUL.
    pub fn parse(instructions: String) -> Result<Self, ValidationError> {
        const FIELD: &str = "instructions";
        check_len(FIELD, &instructions, INSTRUCTIONS_MAX_CHARS)?;
        check_no_nul(FIELD, &instructions)?;
        Ok(Self(instructions))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rule_of<T: fmt::Debug>(r: Result<T, ValidationError>) -> Rule {
        r.unwrap_err().rule
    }

    #[test]
    fn message_text_is_kept_exactly_as_given() {
        for s in [
            "  hello  ",
            "<script>alert('x')</script>",
            "'; DROP TABLE messages; --",
            "👩‍👩‍👧 émoji ✓",
            "line\nbreaks\tand tabs\r\n",
        ] {
            assert_eq!(MessageText::parse(s.to_owned()).unwrap().as_str(), s);
        }
    }

    #[test]
    fn blank_message_text_is_rejected() {
        for s in ["", " ", "\n\t  \r\n", "\u{3000}"] {
            assert_eq!(
                rule_of(MessageText::parse(s.to_owned())),
                Rule::Blank,
                "{s:?}"
            );
        }
    }

    #[test]
    fn message_text_limit_counts_characters_of_the_trimmed_text() {
        let max = "é".repeat(MESSAGE_TEXT_MAX_CHARS); // 64,000 bytes, 32,000 chars
        assert!(MessageText::parse(max.clone()).is_ok());
        assert!(MessageText::parse(format!("   {max}\n\n")).is_ok());
        assert_eq!(
            rule_of(MessageText::parse(format!("{max}x"))),
            Rule::TooLong { max: 32_000 }
        );
    }

    #[test]
    fn message_text_with_nul_is_rejected() {
        assert_eq!(
            rule_of(MessageText::parse("a\0b".to_owned())),
            Rule::ContainsNul
        );
        assert_eq!(
            rule_of(MessageText::parse("ab \0".to_owned())),
            Rule::ContainsNul
        );
    }

    #[test]
    fn validation_errors_name_the_field_and_rule() {
        let err = MessageText::parse(String::new()).unwrap_err();
        assert_eq!(err.field, "text");
        assert_eq!(err.to_string(), "text must not be blank");
    }

    #[test]
    fn assistant_text_allows_long_replies() {
        assert!(AssistantText::parse("a".repeat(100_000)).is_ok());
        assert!(AssistantText::parse("a".repeat(200_001)).is_err());
        assert!(AssistantText::parse("  ".to_owned()).is_err());
    }

    #[test]
    fn titles_are_trimmed_single_lines() {
        assert_eq!(
            Title::parse("  Plans ".to_owned()).unwrap().as_str(),
            "Plans"
        );
        assert_eq!(rule_of(Title::parse("  ".to_owned())), Rule::Blank);
        assert_eq!(
            rule_of(Title::parse("a\nb".to_owned())),
            Rule::ContainsControl
        );
        assert!(Title::parse("t".repeat(200)).is_ok());
        assert_eq!(
            rule_of(Title::parse("t".repeat(201))),
            Rule::TooLong { max: 200 }
        );
    }

    #[test]
    fn system_prompts_may_be_empty_but_not_hold_nul() {
        assert!(SystemPrompt::parse(String::new()).is_ok());
        assert!(SystemPrompt::parse("p".repeat(32_000)).is_ok());
        assert!(SystemPrompt::parse("p".repeat(32_001)).is_err());
        assert_eq!(
            rule_of(SystemPrompt::parse("\0".to_owned())),
            Rule::ContainsNul
        );
    }

    #[test]
    fn model_names_use_a_small_alphabet() {
        assert!(ModelName::parse("gemini-2.5-flash_001".to_owned()).is_ok());
        assert!(ModelName::parse(String::new()).is_err());
        assert!(ModelName::parse("models/gemini".to_owned()).is_err());
        assert!(ModelName::parse("gémini".to_owned()).is_err());
        assert!(ModelName::parse("m".repeat(101)).is_err());
    }

    #[test]
    fn instructions_are_bounded() {
        assert!(Instructions::parse(String::new()).is_ok());
        assert!(Instructions::parse("i".repeat(8_000)).is_ok());
        assert!(Instructions::parse("i".repeat(8_001)).is_err());
        assert!(Instructions::parse("\0".to_owned()).is_err());
    }

    #[test]
    fn user_text_is_not_printed_by_debug() {
        let t = MessageText::parse("secret plans".to_owned()).unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(shown, "MessageText(<12 chars>)");
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<MessageText>("\"  \"").is_err());
        let t: MessageText = serde_json::from_str("\" hi \"").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), "\" hi \"");
    }
}
