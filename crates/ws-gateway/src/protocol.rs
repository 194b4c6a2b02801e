//! The dashboard protocol: JSON text frames, each an object with a `type`.
//! `docs/gateway.md` is the reference; the types here are its source.
//!
//! Class messages (`snapshot`, `subscribed`, `student_update`, `alert`,
//! `resync`) carry the class's `{epoch, offset}`. `student_update` and
//! `alert` are relayed exactly as the persister published them
//! ([`cellmon_domain::live::LiveMessage`]).

use cellmon_domain::live::StudentRef;
use cellmon_domain::lms::ClassId;
use cellmon_domain::status::StudentStatus;
use cellmon_store::messages::DirectMessage;
use serde::{Deserialize, Serialize};

/// A point in a class's live messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// What a dashboard sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub enum ClientMessage {
    /// Join a class: a `snapshot` follows, or with `since`, the messages
    /// after that point and then `subscribed` (or `resync` and a snapshot
    /// when they are no longer kept).
    Subscribe {
        class_id: ClassId,
        #[serde(default)]
        since: Option<Position>,
    },
    Unsubscribe {
        class_id: ClassId,
    },
    Ping,
}

/// One student in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotStudent {
    pub student: StudentRef,
    pub status: StudentStatus,
}

/// Why a class's stream restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    /// The socket fell too far behind; the subscription ended. Subscribe
    /// again (with `since`) when ready.
    Behind,
    /// The requested point is no longer kept, or is from an earlier epoch;
    /// a snapshot follows.
    Gone,
}

/// What the gateway sends (besides the relayed live messages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum ServerMessage {
    Snapshot {
        class_id: ClassId,
        epoch: String,
        offset: u64,
        students: Vec<SnapshotStudent>,
    },
    /// A resumed subscription is live: the missed messages were sent, up
    /// to `offset`.
    Subscribed {
        class_id: ClassId,
        epoch: String,
        offset: u64,
    },
    Unsubscribed {
        class_id: ClassId,
    },
    Resync {
        class_id: ClassId,
        epoch: String,
        offset: u64,
        reason: ResyncReason,
    },
    DirectMessage {
        message: DirectMessage,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        class_id: Option<ClassId>,
    },
}

/// Stable error codes of `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not a known message.
    BadMessage,
    /// The instructor does not teach that class.
    Forbidden,
    /// More subscriptions than allowed on one socket.
    TooManySubscriptions,
    /// More messages per second than allowed; this one was ignored.
    RateLimited,
    /// Postgres or Redis did not answer; try again.
    Unavailable,
}

impl ServerMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>, class_id: Option<ClassId>) -> Self {
        Self::Error {
            code,
            message: message.into(),
            class_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn client_messages_in_camel_case() {
        let class = Uuid::from_u128(1);
        let subscribe: ClientMessage = serde_json::from_value(json!({
            "type": "subscribe", "classId": class, "since": {"epoch": "e", "offset": 4}
        }))
        .unwrap();
        assert_eq!(
            subscribe,
            ClientMessage::Subscribe {
                class_id: ClassId(class),
                since: Some(Position {
                    epoch: "e".into(),
                    offset: 4
                })
            }
        );
        assert_eq!(
            serde_json::from_value::<ClientMessage>(json!({"type": "ping"})).unwrap(),
            ClientMessage::Ping
        );
        assert!(serde_json::from_value::<ClientMessage>(json!({"type": "shout"})).is_err());
        assert!(
            serde_json::from_value::<ClientMessage>(json!({"type": "subscribe", "class": class}))
                .is_err()
        );
    }

    #[test]
    fn server_messages_carry_type_and_position() {
        let resync = ServerMessage::Resync {
            class_id: ClassId(Uuid::from_u128(1)),
            epoch: "e".into(),
            offset: 9,
            reason: ResyncReason::Behind,
        };
        let json = serde_json::to_value(&resync).unwrap();
        assert_eq!(json["type"], "resync");
        assert_eq!(json["offset"], 9);
        assert_eq!(json["reason"], "behind");
        assert!(json.get("classId").is_some());
        assert_eq!(
            serde_json::to_value(ServerMessage::Pong).unwrap(),
            json!({"type": "pong"})
        );
    }
}
