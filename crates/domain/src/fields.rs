//! Validated field types. Each `parse` checks one field and says why it
//! failed; a value of these types is known to be within the limits.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_EMAIL_BYTES, MAX_ID_BYTES, MAX_NAME_CHARS, MAX_PATH_BYTES};

/// Why a single field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("is required for this event type")]
    Missing,
    #[error("is empty")]
    Empty,
    #[error("is {len} bytes long; at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("contains control characters")]
    ControlCharacters,
    #[error("is not a valid e-mail address")]
    NotAnEmail,
    #[error("is not an ISO-8601 date-time")]
    NotADateTime,
    #[error("is not a UUID")]
    NotAUuid,
    #[error("must be one of {expected}")]
    NotOneOf { expected: &'static str },
    #[error("must be between {min} and {max}")]
    OutOfRange { min: String, max: String },
}

fn check_text(raw: &str, max_bytes: usize) -> Result<&str, FieldError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(FieldError::Empty);
    }
    if trimmed.len() > max_bytes {
        return Err(FieldError::TooLong {
            len: trimmed.len(),
            max: max_bytes,
        });
    }
    if trimmed.chars().any(char::is_control) {
        return Err(FieldError::ControlCharacters);
    }
    Ok(trimmed)
}

macro_rules! text_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

text_newtype!(
    /// A student's e-mail address, trimmed and lower-cased: the student's
    /// identity within a class.
    Email
);
text_newtype!(
    /// A display name (student or team): any Unicode, trimmed, no control
    /// characters, at most [`MAX_NAME_CHARS`] characters.
    DisplayName
);
text_newtype!(
    /// A notebook path relative to the student's Jupyter root, such as
    /// `lesson1/intro.ipynb`.
    NotebookPath
);
text_newtype!(
    /// A client-made identifier: a JupyterLab cell id or an LMS user id.
    ClientId
);

impl Email {
    /// Accepts `local@domain` with no spaces; lower-cases it so that
    /// `Hanako@Example.ac.jp` and `hanako@example.ac.jp` are one student.
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let text = check_text(raw, MAX_EMAIL_BYTES)?;
        let (local, domain) = text.split_once('@').ok_or(FieldError::NotAnEmail)?;
        let valid = !local.is_empty()
            && !domain.is_empty()
            && !domain.contains('@')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !text.chars().any(char::is_whitespace)
            // `:` needs quoting in an address, and `user:<id>` names the
            // students identified by an LMS user id instead.
            && !text.contains(':');
        if !valid {
            return Err(FieldError::NotAnEmail);
        }
        Ok(Self(text.to_lowercase()))
    }
}

impl DisplayName {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let text = check_text(raw, MAX_NAME_CHARS * 4)?;
        let chars = text.chars().count();
        if chars > MAX_NAME_CHARS {
            return Err(FieldError::TooLong {
                len: chars,
                max: MAX_NAME_CHARS,
            });
        }
        Ok(Self(text.to_owned()))
    }
}

impl NotebookPath {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        check_text(raw, MAX_PATH_BYTES).map(|t| Self(t.to_owned()))
    }
}

impl ClientId {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        check_text(raw, MAX_ID_BYTES).map(|t| Self(t.to_owned()))
    }
}

/// The kind of a notebook cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellType {
    Code,
    Markdown,
    Raw,
}

impl CellType {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        match raw.trim() {
            "code" => Ok(Self::Code),
            "markdown" => Ok(Self::Markdown),
            "raw" => Ok(Self::Raw),
            _ => Err(FieldError::NotOneOf {
                expected: "code, markdown, raw",
            }),
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Code => "code",
            Self::Markdown => "markdown",
            Self::Raw => "raw",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_normalised() {
        let email = Email::parse("  Hanako.Yamada@Example.AC.jp ").unwrap();
        assert_eq!(email.as_str(), "hanako.yamada@example.ac.jp");
    }

    #[test]
    fn bad_emails_are_refused() {
        for raw in [
            "",
            "   ",
            "no-at-sign",
            "@example.jp",
            "a@",
            "a@@b",
            "a b@c.d",
            "a@.jp",
            "a@jp.",
            // Would read as the LMS user id `x@y.z`.
            "user:x@y.z",
        ] {
            assert!(Email::parse(raw).is_err(), "{raw:?} should be refused");
        }
        let long = format!("{}@example.jp", "a".repeat(MAX_EMAIL_BYTES));
        assert!(matches!(
            Email::parse(&long),
            Err(FieldError::TooLong { .. })
        ));
    }

    #[test]
    fn japanese_names_are_fine_and_counted_in_characters() {
        assert_eq!(
            DisplayName::parse("山田 花子").unwrap().as_str(),
            "山田 花子"
        );
        assert_eq!(DisplayName::parse("チームA").unwrap().as_str(), "チームA");
        let max = "あ".repeat(MAX_NAME_CHARS);
        assert!(DisplayName::parse(&max).is_ok());
        let over = "あ".repeat(MAX_NAME_CHARS + 1);
        assert!(matches!(
            DisplayName::parse(&over),
            Err(FieldError::TooLong { len, .. }) if len == MAX_NAME_CHARS + 1
        ));
    }

    #[test]
    fn control_characters_are_refused() {
        assert_eq!(
            DisplayName::parse("a\u{0}b"),
            Err(FieldError::ControlCharacters)
        );
        assert_eq!(
            NotebookPath::parse("x\n.ipynb"),
            Err(FieldError::ControlCharacters)
        );
    }

    #[test]
    fn cell_type_is_one_of_three() {
        assert_eq!(CellType::parse("code"), Ok(CellType::Code));
        assert_eq!(CellType::parse("markdown"), Ok(CellType::Markdown));
        assert_eq!(CellType::parse("raw"), Ok(CellType::Raw));
        assert!(CellType::parse("python").is_err());
    }
}
