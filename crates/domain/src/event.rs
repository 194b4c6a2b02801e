//! Validated events: what the rest of the system works with.
//!
//! [`validate`] turns one [`WireEvent`] into an [`Event`] or says which field
//! was wrong and why. Each event type requires what its rules need:
//!
//! | event type | required besides `eventType` and `emailAddress` (or `userId`) |
//! | --- | --- |
//! | `cell_executed` | `cellId` |
//! | any other type | nothing |
//!
//! A field sent as an empty or blank string counts as absent: extension
//! builds send `teamName: ""` when no team is set and `notebookPath: ""` when
//! a cell has no notebook context, and neither should cost the event.
//!
//! Free text (`code`, `result`, `errorMessage`) is kept as sent, except that
//! NUL characters, which Postgres cannot store, become U+FFFD. `code` over
//! [`MAX_CODE_BYTES`] refuses the event; `result` and `errorMessage` over their
//! limits are cut at a character boundary, because losing an execution record
//! over a long traceback would hide exactly the student who needs help.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::fields::{CellType, ClientId, DisplayName, Email, FieldError, NotebookPath};
use crate::id::EventId;
use crate::limits::{
    MAX_CODE_BYTES, MAX_COUNTER, MAX_DURATION_MS, MAX_ERROR_MESSAGE_BYTES, MAX_EVENT_TYPE_BYTES,
    MAX_RESULT_BYTES,
};
use crate::wire::WireEvent;

/// A validated event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: EventId,
    pub kind: EventKind,
    /// The client's clock, in UTC, when the client sent one.
    #[serde(with = "time::serde::rfc3339::option")]
    pub client_time: Option<OffsetDateTime>,
    /// The server's clock when the event was received.
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    pub student: Student,
    pub session_id: Option<ClientId>,
    pub notebook: Option<NotebookPath>,
    pub cell: Option<CellRef>,
}

impl Event {
    /// The time the event is ordered by: the client's clock when present (it
    /// is what the student experienced, and it survives spooling and
    /// replays), else the receive time.
    pub fn time(&self) -> OffsetDateTime {
        self.client_time.unwrap_or(self.received_at)
    }

    /// The wire form of this event, with its id explicit. Validating it again
    /// (with the same receive time) gives back an equal event.
    pub fn to_wire(&self) -> WireEvent {
        let (email_address, user_id) = match &self.student.key {
            StudentKey::Email(email) => (Some(email.to_string()), None),
            StudentKey::UserId(id) => (None, Some(id.to_string())),
        };
        let mut wire = WireEvent {
            event_id: Some(self.id.to_string()),
            event_type: Some(self.kind.type_name().to_owned()),
            event_time: self
                .client_time
                .map(|t| t.format(&Rfc3339).unwrap_or_default()),
            email_address,
            user_id,
            user_name: self.student.name.as_ref().map(ToString::to_string),
            team_name: self.student.team.as_ref().map(ToString::to_string),
            session_id: self.session_id.as_ref().map(ToString::to_string),
            notebook_path: self.notebook.as_ref().map(ToString::to_string),
            ..WireEvent::default()
        };
        if let Some(cell) = &self.cell {
            wire.cell_id = Some(cell.id.to_string());
            wire.cell_index = cell.index.map(i64::from);
            wire.cell_type = cell.cell_type.map(|t| t.as_str().to_owned());
        }
        if let EventKind::CellExecuted(exec) = &self.kind {
            wire.code = exec.code.clone();
            wire.execution_count = exec.execution_count.map(i64::from);
            wire.has_error = Some(exec.has_error);
            wire.error_message = exec.error_message.clone();
            wire.result = exec.result.clone();
            wire.execution_duration_ms = exec.duration_ms;
        }
        wire
    }
}

/// What happened, with the data that only that kind of event carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    CellExecuted(Execution),
    NotebookOpened,
    NotebookSaved,
    NotebookClosed,
    Help,
    HelpStop,
    /// A type this version does not know; stored as a generic event.
    Other {
        name: String,
    },
}

impl EventKind {
    /// The `eventType` string of this kind.
    pub fn type_name(&self) -> &str {
        match self {
            Self::CellExecuted(_) => "cell_executed",
            Self::NotebookOpened => "notebook_opened",
            Self::NotebookSaved => "notebook_saved",
            Self::NotebookClosed => "notebook_closed",
            Self::Help => "help",
            Self::HelpStop => "help_stop",
            Self::Other { name } => name,
        }
    }
}

/// One run of a cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub code: Option<String>,
    pub execution_count: Option<u32>,
    pub has_error: bool,
    pub error_message: Option<String>,
    pub result: Option<String>,
    pub duration_ms: Option<f64>,
}

/// Who sent the event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Student {
    pub key: StudentKey,
    pub name: Option<DisplayName>,
    pub team: Option<DisplayName>,
}

/// A student's identity within a class: the e-mail address, or an LMS user
/// id for deployments that have no e-mail.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudentKey {
    Email(Email),
    UserId(ClientId),
}

impl fmt::Display for StudentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Email(email) => email.fmt(f),
            Self::UserId(id) => write!(f, "user:{id}"),
        }
    }
}

/// A notebook cell as the event names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CellRef {
    pub id: ClientId,
    pub index: Option<u32>,
    pub cell_type: Option<CellType>,
}

/// Why an event was refused: the wire field (camelCase) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {error}")]
pub struct ValidationError {
    pub field: &'static str,
    pub error: FieldError,
}

fn at(field: &'static str) -> impl FnOnce(FieldError) -> ValidationError {
    move |error| ValidationError { field, error }
}

/// A wire string that is absent, empty or blank is absent.
fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.trim().is_empty())
}

fn required<'a>(
    field: &'static str,
    value: &'a Option<String>,
) -> Result<&'a str, ValidationError> {
    present(value).ok_or(ValidationError {
        field,
        error: FieldError::Missing,
    })
}

fn optional<T>(
    field: &'static str,
    value: &Option<String>,
    parse: impl FnOnce(&str) -> Result<T, FieldError>,
) -> Result<Option<T>, ValidationError> {
    present(value).map(parse).transpose().map_err(at(field))
}

/// Validates one wire event received at `received_at`.
pub fn validate(wire: WireEvent, received_at: OffsetDateTime) -> Result<Event, ValidationError> {
    let id = EventId::for_wire(&wire).0;
    let type_name = required("eventType", &wire.event_type)?.trim();
    if type_name.len() > MAX_EVENT_TYPE_BYTES {
        return Err(at("eventType")(FieldError::TooLong {
            len: type_name.len(),
            max: MAX_EVENT_TYPE_BYTES,
        }));
    }
    if type_name.chars().any(char::is_control) {
        return Err(at("eventType")(FieldError::ControlCharacters));
    }

    let key = match (present(&wire.email_address), present(&wire.user_id)) {
        (Some(email), _) => StudentKey::Email(Email::parse(email).map_err(at("emailAddress"))?),
        (None, Some(user)) => StudentKey::UserId(ClientId::parse(user).map_err(at("userId"))?),
        (None, None) => return Err(at("emailAddress")(FieldError::Missing)),
    };
    let student = Student {
        key,
        name: optional("userName", &wire.user_name, DisplayName::parse)?,
        team: optional("teamName", &wire.team_name, DisplayName::parse)?,
    };

    let client_time = optional("eventTime", &wire.event_time, parse_time)?;
    let session_id = optional("sessionId", &wire.session_id, ClientId::parse)?;
    let notebook = optional("notebookPath", &wire.notebook_path, NotebookPath::parse)?;
    let cell_id = optional("cellId", &wire.cell_id, ClientId::parse)?;
    let cell_index = optional_counter("cellIndex", wire.cell_index)?;
    let cell_type = optional("cellType", &wire.cell_type, CellType::parse)?;
    let cell = cell_id.map(|id| CellRef {
        id,
        index: cell_index,
        cell_type,
    });

    let kind = match type_name {
        "cell_executed" => {
            required("cellId", &wire.cell_id)?;
            EventKind::CellExecuted(execution(&wire)?)
        }
        "notebook_opened" => EventKind::NotebookOpened,
        "notebook_saved" => EventKind::NotebookSaved,
        "notebook_closed" => EventKind::NotebookClosed,
        "help" => EventKind::Help,
        "help_stop" => EventKind::HelpStop,
        other => EventKind::Other {
            name: other.to_owned(),
        },
    };

    Ok(Event {
        id,
        kind,
        client_time,
        received_at,
        student,
        session_id,
        notebook,
        cell,
    })
}

fn execution(wire: &WireEvent) -> Result<Execution, ValidationError> {
    let code = match &wire.code {
        Some(code) if code.len() > MAX_CODE_BYTES => {
            return Err(at("code")(FieldError::TooLong {
                len: code.len(),
                max: MAX_CODE_BYTES,
            }));
        }
        Some(code) => Some(storable(code)),
        None => None,
    };
    let error_message = wire
        .error_message
        .as_deref()
        .map(|m| truncate(&storable(m), MAX_ERROR_MESSAGE_BYTES));
    let duration_ms = match wire.execution_duration_ms {
        Some(ms) if !(0.0..=MAX_DURATION_MS).contains(&ms) => {
            return Err(at("executionDurationMs")(FieldError::OutOfRange {
                min: "0".into(),
                max: MAX_DURATION_MS.to_string(),
            }));
        }
        other => other,
    };
    Ok(Execution {
        code,
        execution_count: optional_counter("executionCount", wire.execution_count)?,
        // An error message without the flag still means the run failed.
        has_error: wire.has_error.unwrap_or(error_message.is_some()),
        error_message,
        result: wire
            .result
            .as_deref()
            .map(|r| truncate(&storable(r), MAX_RESULT_BYTES)),
        duration_ms,
    })
}

fn optional_counter(
    field: &'static str,
    value: Option<i64>,
) -> Result<Option<u32>, ValidationError> {
    match value {
        None => Ok(None),
        Some(n) if (0..=MAX_COUNTER).contains(&n) => Ok(u32::try_from(n).ok()),
        Some(_) => Err(at(field)(FieldError::OutOfRange {
            min: "0".into(),
            max: MAX_COUNTER.to_string(),
        })),
    }
}

/// Replaces NUL, which Postgres text columns cannot hold.
fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// Cuts `text` to at most `max` bytes at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Earliest and latest accepted event times: InfluxDB's nanosecond
/// timestamps cover 1677 to 2262; anything outside this window is a broken
/// clock, not a classroom.
const EARLIEST_YEAR: i32 = 1970;
const LATEST_YEAR: i32 = 2200;

/// Parses RFC 3339 (`2026-04-01T10:00:00.123Z`, what JavaScript's
/// `toISOString` sends) or a date-time without offset, taken as UTC (what
/// Python's `isoformat` sends for naive times). The result is in UTC.
fn parse_time(raw: &str) -> Result<OffsetDateTime, FieldError> {
    let raw = raw.trim();
    let parsed = OffsetDateTime::parse(raw, &Rfc3339).or_else(|_| {
        let naive = time::macros::format_description!(
            version = 2,
            "[year]-[month]-[day][first [T][ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
        );
        PrimitiveDateTime::parse(raw, &naive).map(PrimitiveDateTime::assume_utc)
    });
    let time = parsed
        .map_err(|_| FieldError::NotADateTime)?
        .to_offset(UtcOffset::UTC);
    if !(EARLIEST_YEAR..LATEST_YEAR).contains(&time.year()) {
        return Err(FieldError::OutOfRange {
            min: format!("{EARLIEST_YEAR}-01-01"),
            max: format!("{LATEST_YEAR}-01-01"),
        });
    }
    Ok(time)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-04-01 10:00:05 UTC);

    fn executed() -> WireEvent {
        WireEvent {
            event_id: Some("0b3c4f9e-8a61-4f5e-9c47-2f6f1d9b7a10".into()),
            event_type: Some("cell_executed".into()),
            event_time: Some("2026-04-01T10:00:00.123Z".into()),
            email_address: Some("hanako@example.ac.jp".into()),
            user_name: Some("山田 花子".into()),
            team_name: Some("チームA".into()),
            session_id: Some("6f1e3a52-0c57-4d1e-a4f5-3b0b6a2d9c11".into()),
            notebook_path: Some("lesson1/intro.ipynb".into()),
            cell_id: Some("a1b2".into()),
            cell_index: Some(3),
            cell_type: Some("code".into()),
            code: Some("print(x)".into()),
            execution_count: Some(7),
            has_error: Some(true),
            error_message: Some("NameError: name 'x' is not defined".into()),
            result: None,
            execution_duration_ms: Some(12.5),
            ..WireEvent::default()
        }
    }

    fn err_field(wire: WireEvent) -> (&'static str, FieldError) {
        let e = validate(wire, NOW).unwrap_err();
        (e.field, e.error)
    }

    #[test]
    fn a_full_cell_execution_validates() {
        let event = validate(executed(), NOW).unwrap();
        assert_eq!(event.time(), datetime!(2026-04-01 10:00:00.123 UTC));
        assert_eq!(event.received_at, NOW);
        assert_eq!(event.student.team.unwrap().as_str(), "チームA");
        assert_eq!(event.cell.unwrap().index, Some(3));
        let EventKind::CellExecuted(exec) = event.kind else {
            panic!("expected an execution");
        };
        assert!(exec.has_error);
        assert_eq!(exec.execution_count, Some(7));
    }

    #[test]
    fn identity_is_required() {
        let wire = WireEvent {
            email_address: None,
            ..executed()
        };
        assert_eq!(err_field(wire), ("emailAddress", FieldError::Missing));
        let by_user_id = WireEvent {
            email_address: None,
            user_id: Some("s-1024".into()),
            ..executed()
        };
        let event = validate(by_user_id, NOW).unwrap();
        assert_eq!(event.student.key.to_string(), "user:s-1024");
    }

    #[test]
    fn each_type_requires_its_fields() {
        let no_cell = WireEvent {
            cell_id: None,
            ..executed()
        };
        assert_eq!(err_field(no_cell), ("cellId", FieldError::Missing));
        let blank_cell = WireEvent {
            cell_id: Some("  ".into()),
            ..executed()
        };
        assert_eq!(err_field(blank_cell), ("cellId", FieldError::Missing));
        let opened_without_path = WireEvent {
            event_type: Some("notebook_opened".into()),
            notebook_path: None,
            ..executed()
        };
        assert_eq!(
            validate(opened_without_path, NOW).unwrap().kind,
            EventKind::NotebookOpened
        );
        let help = WireEvent {
            event_type: Some("help".into()),
            email_address: Some("a@b.jp".into()),
            ..WireEvent::default()
        };
        assert_eq!(validate(help, NOW).unwrap().kind, EventKind::Help);
        let no_type = WireEvent {
            event_type: None,
            ..executed()
        };
        assert_eq!(err_field(no_type), ("eventType", FieldError::Missing));
    }

    #[test]
    fn blank_optional_fields_count_as_absent() {
        // What extension builds send when no team is set and a cell has no
        // notebook context.
        let wire = WireEvent {
            team_name: Some(String::new()),
            user_name: Some(" ".into()),
            notebook_path: Some(String::new()),
            session_id: Some(String::new()),
            ..executed()
        };
        let event = validate(wire, NOW).unwrap();
        assert_eq!(event.student.team, None);
        assert_eq!(event.student.name, None);
        assert_eq!(event.notebook, None);
        assert_eq!(event.session_id, None);
        let blank_email_with_user_id = WireEvent {
            email_address: Some(String::new()),
            user_id: Some("s-1".into()),
            ..executed()
        };
        assert_eq!(
            validate(blank_email_with_user_id, NOW)
                .unwrap()
                .student
                .key
                .to_string(),
            "user:s-1"
        );
        let blank_type = WireEvent {
            event_type: Some(" ".into()),
            ..executed()
        };
        assert_eq!(err_field(blank_type), ("eventType", FieldError::Missing));
    }

    #[test]
    fn unknown_types_are_kept_as_generic_events() {
        let wire = WireEvent {
            event_type: Some("kernel_restarted".into()),
            ..executed()
        };
        let event = validate(wire, NOW).unwrap();
        assert_eq!(
            event.kind,
            EventKind::Other {
                name: "kernel_restarted".into()
            }
        );
    }

    #[test]
    fn times_are_parsed_in_both_iso_forms_and_bounded() {
        let naive = WireEvent {
            event_time: Some("2026-04-01T19:00:00.5".into()),
            ..executed()
        };
        assert_eq!(
            validate(naive, NOW).unwrap().time(),
            datetime!(2026-04-01 19:00:00.5 UTC)
        );
        let offset = WireEvent {
            event_time: Some("2026-04-01T19:00:00+09:00".into()),
            ..executed()
        };
        assert_eq!(
            validate(offset, NOW).unwrap().time(),
            datetime!(2026-04-01 10:00:00 UTC)
        );
        let garbage = WireEvent {
            event_time: Some("yesterday".into()),
            ..executed()
        };
        assert_eq!(err_field(garbage), ("eventTime", FieldError::NotADateTime));
        let far = WireEvent {
            event_time: Some("2999-01-01T00:00:00Z".into()),
            ..executed()
        };
        assert!(matches!(
            err_field(far),
            ("eventTime", FieldError::OutOfRange { .. })
        ));
        let absent = WireEvent {
            event_time: None,
            ..executed()
        };
        assert_eq!(validate(absent, NOW).unwrap().time(), NOW);
    }

    #[test]
    fn huge_code_is_refused_but_long_output_is_cut() {
        let huge = WireEvent {
            code: Some("x".repeat(MAX_CODE_BYTES + 1)),
            ..executed()
        };
        assert!(matches!(
            err_field(huge),
            ("code", FieldError::TooLong { .. })
        ));
        let long_output = WireEvent {
            result: Some("あ".repeat(MAX_RESULT_BYTES)),
            ..executed()
        };
        let EventKind::CellExecuted(exec) = validate(long_output, NOW).unwrap().kind else {
            panic!("expected an execution");
        };
        let result = exec.result.unwrap();
        assert!(result.len() <= MAX_RESULT_BYTES && result.len() > MAX_RESULT_BYTES - 3);
    }

    #[test]
    fn numbers_are_range_checked() {
        let negative = WireEvent {
            cell_index: Some(-1),
            ..executed()
        };
        assert!(matches!(
            err_field(negative),
            ("cellIndex", FieldError::OutOfRange { .. })
        ));
        let slow = WireEvent {
            execution_duration_ms: Some(-3.0),
            ..executed()
        };
        assert!(matches!(
            err_field(slow),
            ("executionDurationMs", FieldError::OutOfRange { .. })
        ));
    }

    #[test]
    fn error_message_implies_failure_and_nul_is_replaced() {
        let wire = WireEvent {
            has_error: None,
            error_message: Some("ZeroDivisionError\0".into()),
            ..executed()
        };
        let EventKind::CellExecuted(exec) = validate(wire, NOW).unwrap().kind else {
            panic!("expected an execution");
        };
        assert!(exec.has_error);
        assert_eq!(
            exec.error_message.as_deref(),
            Some("ZeroDivisionError\u{FFFD}")
        );
    }

    #[test]
    fn to_wire_round_trips() {
        let event = validate(executed(), NOW).unwrap();
        assert_eq!(validate(event.to_wire(), NOW).unwrap(), event);
    }

    #[test]
    fn error_names_the_field() {
        let e = validate(
            WireEvent {
                email_address: Some("nope".into()),
                ..executed()
            },
            NOW,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "`emailAddress` is not a valid e-mail address"
        );
    }
}
