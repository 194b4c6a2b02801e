//! The course-management entities: who teaches and who takes which class,
//! and what students hand in. Plain data; the store crate persists them.

use std::num::NonZeroU8;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::event::StudentKey;
use crate::fields::{DisplayName, Email, NotebookPath};

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random id.
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(ClassId);
uuid_id!(InstructorId);
uuid_id!(StudentId);
uuid_id!(TeamId);
uuid_id!(AssignmentId);
uuid_id!(SubmissionId);
uuid_id!(SessionId);
uuid_id!(NotebookId);

/// Per-class settings that the status rules read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSettings {
    /// How many consecutive failed runs of one cell make a significant error.
    pub consecutive_error_threshold: NonZeroU8,
    /// How long after their last activity a student counts as idle.
    #[serde(with = "seconds")]
    pub idle_after: Duration,
}

impl Default for ClassSettings {
    fn default() -> Self {
        Self {
            consecutive_error_threshold: NonZeroU8::new(3).unwrap_or(NonZeroU8::MIN),
            idle_after: Duration::minutes(5),
        }
    }
}

mod seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(d.whole_seconds())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        i64::deserialize(d).map(Duration::seconds)
    }
}

/// A course run: the unit of attribution, authorization and the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Class {
    pub id: ClassId,
    pub name: String,
    pub settings: ClassSettings,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instructor {
    pub id: InstructorId,
    pub email: Email,
    pub name: DisplayName,
}

/// A student of one class. The same person in two classes is two students:
/// identity is per class, by [`StudentKey`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Student {
    pub id: StudentId,
    pub class_id: ClassId,
    pub key: StudentKey,
    pub name: Option<DisplayName>,
    pub team_id: Option<TeamId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    pub id: TeamId,
    pub class_id: ClassId,
    pub name: DisplayName,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub id: AssignmentId,
    pub class_id: ClassId,
    pub title: String,
    pub notebook: Option<NotebookPath>,
    pub due_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    pub id: SubmissionId,
    pub assignment_id: AssignmentId,
    pub student_id: StudentId,
    pub submitted_at: OffsetDateTime,
    pub grade: Option<f32>,
}

/// One browser session of a student, as the extension reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    pub student_id: StudentId,
    /// The extension's own session id string.
    pub client_session: String,
    pub first_seen: OffsetDateTime,
    pub last_seen: OffsetDateTime,
}

/// A notebook of one student: the same path for two students is two notebooks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notebook {
    pub id: NotebookId,
    pub student_id: StudentId,
    pub path: NotebookPath,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_settings_match_the_mission() {
        let settings = ClassSettings::default();
        assert_eq!(settings.consecutive_error_threshold.get(), 3);
        assert_eq!(settings.idle_after, Duration::minutes(5));
    }

    #[test]
    fn settings_serialise_durations_as_seconds() {
        let json = serde_json::to_string(&ClassSettings::default()).unwrap();
        assert_eq!(
            json,
            r#"{"consecutive_error_threshold":3,"idle_after":300}"#
        );
        let back: ClassSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ClassSettings::default());
    }
}
