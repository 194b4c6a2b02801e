//! What the persister tells live dashboards, and the ws-gateway relays.
//!
//! After every committed batch the persister recomputes the status of the
//! students the batch touched and publishes, per class, a [`LiveMessage`]
//! for each: a [`LiveBody::StudentUpdate`] with the whole status, and an
//! [`LiveBody::Alert`] for each change an instructor must notice (a new help
//! request, a new significant error, or one of them ending). Messages carry
//! the class's `{epoch, offset}`: offsets increase by one per message within
//! an epoch, and a new epoch means the history was lost (a client then needs
//! a fresh snapshot).

use serde::{Deserialize, Serialize};

use crate::event::StudentKey;
use crate::fields::{DisplayName, NotebookPath};
use crate::lms::{ClassId, StudentId};
use crate::status::{CellKey, StudentStatus};

/// Who a message is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StudentRef {
    pub id: StudentId,
    pub key: StudentKey,
    pub name: Option<DisplayName>,
    pub team: Option<DisplayName>,
}

/// Something an instructor must notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "alert", rename_all = "snake_case")]
pub enum Alert {
    /// A new help request (not dismissed).
    Help { notebook: Option<NotebookPath> },
    /// A cell newly reached the consecutive-error threshold.
    SignificantError { cell: CellKey },
    /// A help request ended (help_stop, lapse or dismissal).
    HelpResolved { notebook: Option<NotebookPath> },
    /// A significant error ended (success, or an instructor resolved it).
    ErrorResolved { cell: CellKey },
}

/// The payload of a live message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveBody {
    StudentUpdate {
        student: StudentRef,
        status: StudentStatus,
    },
    Alert {
        student: StudentRef,
        #[serde(flatten)]
        alert: Alert,
    },
}

/// A live message as published and kept in the class's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveMessage {
    /// Changes when the class's history was lost and numbering restarted.
    pub epoch: String,
    /// 1, 2, 3, ... within an epoch, in publication order.
    pub offset: u64,
    pub class_id: ClassId,
    #[serde(flatten)]
    pub body: LiveBody,
}

/// A live message before the bus numbered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unnumbered {
    pub class_id: ClassId,
    #[serde(flatten)]
    pub body: LiveBody,
}

/// The alerts raised by a change of status from `before` (none when the
/// student had no status yet) to `after`.
pub fn alerts(before: Option<&StudentStatus>, after: &StudentStatus) -> Vec<Alert> {
    let open_help = |s: &StudentStatus| -> Vec<Option<NotebookPath>> {
        s.help
            .iter()
            .filter(|r| !r.dismissed)
            .map(|r| r.notebook.clone())
            .collect()
    };
    let errors = |s: &StudentStatus| -> Vec<CellKey> {
        s.significant_errors
            .iter()
            .map(|e| e.cell.clone())
            .collect()
    };
    let (help_before, errors_before) =
        before.map_or((Vec::new(), Vec::new()), |s| (open_help(s), errors(s)));
    let (help_after, errors_after) = (open_help(after), errors(after));

    let mut alerts = Vec::new();
    for notebook in &help_after {
        if !help_before.contains(notebook) {
            alerts.push(Alert::Help {
                notebook: notebook.clone(),
            });
        }
    }
    for cell in &errors_after {
        if !errors_before.contains(cell) {
            alerts.push(Alert::SignificantError { cell: cell.clone() });
        }
    }
    for notebook in help_before {
        if !help_after.contains(&notebook) {
            alerts.push(Alert::HelpResolved { notebook });
        }
    }
    for cell in errors_before {
        if !errors_after.contains(&cell) {
            alerts.push(Alert::ErrorResolved { cell });
        }
    }
    alerts
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;
    use uuid::Uuid;

    use super::*;
    use crate::fields::ClientId;
    use crate::id::EventId;
    use crate::status::{HelpRequest, OrderKey, SignificantError, Status};

    fn key(n: u128) -> OrderKey {
        OrderKey {
            time: datetime!(2026-04-01 10:00 UTC),
            id: EventId::from_uuid(Uuid::from_u128(n)),
        }
    }

    fn idle() -> StudentStatus {
        StudentStatus {
            status: Status::Idle,
            help: Vec::new(),
            significant_errors: Vec::new(),
            last_execution_failed: false,
            last_activity: None,
            executions: 0,
            failed_executions: 0,
        }
    }

    fn notebook() -> Option<NotebookPath> {
        Some(NotebookPath::parse("lesson1.ipynb").unwrap())
    }

    fn cell() -> CellKey {
        CellKey {
            notebook: notebook(),
            cell: ClientId::parse("c1").unwrap(),
        }
    }

    fn asking(dismissed: bool) -> StudentStatus {
        StudentStatus {
            status: Status::Help,
            help: vec![HelpRequest {
                notebook: notebook(),
                started: key(1),
                latest: key(2),
                dismissed,
            }],
            ..idle()
        }
    }

    fn failing() -> StudentStatus {
        StudentStatus {
            status: Status::SignificantError,
            significant_errors: vec![SignificantError {
                cell: cell(),
                consecutive_failures: 3,
                latest: key(3),
            }],
            ..idle()
        }
    }

    #[test]
    fn a_new_request_alerts_once() {
        assert_eq!(
            alerts(None, &asking(false)),
            vec![Alert::Help {
                notebook: notebook()
            }]
        );
        // A heartbeat that only moves `latest` is no new alert.
        assert_eq!(alerts(Some(&asking(false)), &asking(false)), vec![]);
    }

    #[test]
    fn dismissal_and_stop_resolve_help() {
        let resolved = vec![Alert::HelpResolved {
            notebook: notebook(),
        }];
        assert_eq!(alerts(Some(&asking(false)), &asking(true)), resolved);
        assert_eq!(alerts(Some(&asking(false)), &idle()), resolved);
        // A dismissed request coming and going raises nothing.
        assert_eq!(alerts(Some(&asking(true)), &idle()), vec![]);
    }

    #[test]
    fn significant_errors_raise_and_resolve() {
        assert_eq!(
            alerts(Some(&idle()), &failing()),
            vec![Alert::SignificantError { cell: cell() }]
        );
        assert_eq!(
            alerts(Some(&failing()), &idle()),
            vec![Alert::ErrorResolved { cell: cell() }]
        );
    }

    #[test]
    fn messages_are_flat_json_with_a_type() {
        let message = LiveMessage {
            epoch: "e1".into(),
            offset: 7,
            class_id: ClassId(Uuid::from_u128(9)),
            body: LiveBody::Alert {
                student: StudentRef {
                    id: StudentId(Uuid::from_u128(5)),
                    key: StudentKey::Email(crate::fields::Email::parse("a@b.c").unwrap()),
                    name: None,
                    team: None,
                },
                alert: Alert::Help {
                    notebook: notebook(),
                },
            },
        };
        let json = serde_json::to_value(&message).unwrap();
        assert_eq!(json["type"], "alert");
        assert_eq!(json["alert"], "help");
        assert_eq!(json["offset"], 7);
        let back: LiveMessage = serde_json::from_value(json).unwrap();
        assert_eq!(back, message);
    }
}
