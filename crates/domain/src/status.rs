//! The status rules, as pure functions of a student's stored events, the
//! instructor's actions and the time (passed in; nothing here reads a clock).
//!
//! Events are put in one canonical order, by event time and then by event id,
//! and duplicates (the same id twice) count once. The result therefore does
//! not depend on the order or the number of times a worker saw the events,
//! so retries, replays and parallel consumers cannot fabricate or hide an
//! alert (ARCHITECTURE.md rule 5).
//!
//! * **help**: the extension keeps one help toggle per notebook, so help is
//!   tracked per notebook. A notebook's help is active while its newest
//!   `help`/`help_stop` of the last [`StatusRules::help_window`] is `help`.
//!   Heartbeats (`help` every 10 s) extend one *request*; a request starts at
//!   a `help` that follows a `help_stop`, nothing, or a silence longer than
//!   the window. A dismissal names an event inside the request it dismisses
//!   (the newest the instructor saw), so it sticks through that request's
//!   heartbeats, including ones that arrive late with earlier times, and
//!   ends when the student raises a new request. No instructor clock is
//!   compared with a student's, so clock skew cannot undo a dismissal.
//! * **significant error**: the last N runs of one cell all failed (N is
//!   the class's threshold). A later success of that cell clears it, and so
//!   does an instructor's resolution, which covers the runs up to the one it
//!   names: N new failures after it raise the alert again.
//! * **error**: the student's last run of any cell failed.
//! * **active**: any event within [`StatusRules::idle_after`] of now.
//! * **idle**: none of the above.

use std::collections::BTreeMap;
use std::num::NonZeroU8;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::event::{Event, EventKind};
use crate::fields::{ClientId, NotebookPath};
use crate::id::EventId;
use crate::lms::ClassSettings;

/// How often the extension re-sends `help` while the toggle is on.
pub const HELP_HEARTBEAT: Duration = Duration::seconds(10);

/// How long a `help` counts without a newer heartbeat.
pub const HELP_WINDOW: Duration = Duration::minutes(5);

/// An event's place in the canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderKey {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub id: EventId,
}

/// A cell of a student's notebook (the notebook is unknown when the
/// extension had no notebook context).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CellKey {
    pub notebook: Option<NotebookPath>,
    pub cell: ClientId,
}

/// What an event means to the status rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activity {
    Execution {
        cell: CellKey,
        failed: bool,
    },
    Help {
        notebook: Option<NotebookPath>,
    },
    HelpStop {
        notebook: Option<NotebookPath>,
    },
    /// Anything else the student did (opened or saved a notebook, ...).
    Other,
}

/// One event as the status rules see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityEvent {
    pub key: OrderKey,
    pub activity: Activity,
}

impl From<&Event> for ActivityEvent {
    fn from(event: &Event) -> Self {
        let notebook = event.notebook.clone();
        let activity = match (&event.kind, &event.cell) {
            (EventKind::CellExecuted(exec), Some(cell)) => Activity::Execution {
                cell: CellKey {
                    notebook,
                    cell: cell.id.clone(),
                },
                failed: exec.has_error,
            },
            (EventKind::Help, _) => Activity::Help { notebook },
            (EventKind::HelpStop, _) => Activity::HelpStop { notebook },
            _ => Activity::Other,
        };
        Self {
            key: OrderKey {
                time: event.time(),
                id: event.id,
            },
            activity,
        }
    }
}

/// What an instructor did about a student.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstructorAction {
    /// Dismiss the help request of `notebook` that contains the `help`
    /// event at `through` (the newest one the instructor saw).
    DismissHelp {
        notebook: Option<NotebookPath>,
        through: OrderKey,
    },
    /// Resolve the errors of `cell` up to and including the run at `through`.
    ResolveError { cell: CellKey, through: OrderKey },
}

/// The parameters of the rules, usually from the class's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRules {
    pub consecutive_errors: NonZeroU8,
    pub idle_after: Duration,
    pub help_window: Duration,
}

impl From<&ClassSettings> for StatusRules {
    fn from(settings: &ClassSettings) -> Self {
        Self {
            consecutive_errors: settings.consecutive_error_threshold,
            idle_after: settings.idle_after,
            help_window: HELP_WINDOW,
        }
    }
}

impl Default for StatusRules {
    fn default() -> Self {
        Self::from(&ClassSettings::default())
    }
}

/// Dashboard status, most urgent first (the derived `Ord` follows urgency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Help,
    SignificantError,
    Error,
    Active,
    Idle,
    /// Enrolled on the roster but has sent no event yet. Never derived
    /// from events: only the dashboard snapshot and the roster use it.
    NotStarted,
}

/// A help request that is active now (its heartbeats have not lapsed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelpRequest {
    pub notebook: Option<NotebookPath>,
    /// The `help` event that started the request.
    pub started: OrderKey,
    /// The newest heartbeat: what a dismissal names.
    pub latest: OrderKey,
    /// An instructor dismissed it; it stays dismissed until a new request.
    pub dismissed: bool,
}

/// A cell whose last runs all failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignificantError {
    pub cell: CellKey,
    pub consecutive_failures: u32,
    /// The newest failed run: what an instructor's resolution names.
    pub latest: OrderKey,
}

/// Everything the dashboard shows about one student.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StudentStatus {
    pub status: Status,
    /// Active help requests, oldest first, dismissed ones included.
    pub help: Vec<HelpRequest>,
    pub significant_errors: Vec<SignificantError>,
    pub last_execution_failed: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_activity: Option<OffsetDateTime>,
    pub executions: u32,
    pub failed_executions: u32,
}

/// Puts events in canonical order with each id once. When the same id shows
/// up with different times (a content-derived id re-sent without a client
/// clock), the earliest time wins, whatever order they came in.
pub fn canonical_order(events: &[ActivityEvent]) -> Vec<&ActivityEvent> {
    let mut by_id: Vec<&ActivityEvent> = events.iter().collect();
    by_id.sort_by_key(|e| (e.key.id, e.key.time));
    by_id.dedup_by_key(|e| e.key.id);
    by_id.sort_by_key(|e| e.key);
    by_id
}

/// Derives a student's status from their events (any order, duplicates
/// allowed), the instructor's actions about them, and the current time.
pub fn derive_status(
    events: &[ActivityEvent],
    actions: &[InstructorAction],
    rules: &StatusRules,
    now: OffsetDateTime,
) -> StudentStatus {
    let ordered = canonical_order(events);
    let help = help_requests(&ordered, actions, rules, now);
    let significant_errors = significant_errors(&ordered, actions, rules);

    let mut executions = 0;
    let mut failed_executions = 0;
    let mut last_execution_failed = false;
    for event in &ordered {
        if let Activity::Execution { failed, .. } = event.activity {
            executions += 1;
            failed_executions += u32::from(failed);
            last_execution_failed = failed;
        }
    }
    let last_activity = ordered.last().map(|e| e.key.time);

    let status = if help.iter().any(|r| !r.dismissed) {
        Status::Help
    } else if !significant_errors.is_empty() {
        Status::SignificantError
    } else if last_execution_failed {
        Status::Error
    } else if last_activity.is_some_and(|t| now - t <= rules.idle_after) {
        Status::Active
    } else {
        Status::Idle
    };

    StudentStatus {
        status,
        help,
        significant_errors,
        last_execution_failed,
        last_activity,
        executions,
        failed_executions,
    }
}

fn help_requests(
    ordered: &[&ActivityEvent],
    actions: &[InstructorAction],
    rules: &StatusRules,
    now: OffsetDateTime,
) -> Vec<HelpRequest> {
    /// Per notebook: the request in progress (start, newest heartbeat) and
    /// the time of the newest help or help_stop.
    type Track = (Option<(OrderKey, OrderKey)>, OffsetDateTime);
    let mut tracks: BTreeMap<Option<&NotebookPath>, Track> = BTreeMap::new();
    for event in ordered {
        match &event.activity {
            Activity::Help { notebook } => {
                let (request, newest) = tracks
                    .entry(notebook.as_ref())
                    .or_insert((None, event.key.time));
                *request = match *request {
                    Some((start, last)) if event.key.time - last.time <= rules.help_window => {
                        Some((start, event.key))
                    }
                    _ => Some((event.key, event.key)),
                };
                *newest = event.key.time;
            }
            Activity::HelpStop { notebook } => {
                tracks.insert(notebook.as_ref(), (None, event.key.time));
            }
            _ => {}
        }
    }
    let mut requests: Vec<HelpRequest> = tracks
        .into_iter()
        .filter(|(_, (_, newest))| now - *newest <= rules.help_window)
        .filter_map(|(notebook, (request, _))| {
            let (started, latest) = request?;
            let dismissed = actions.iter().any(|a| {
                matches!(a, InstructorAction::DismissHelp { notebook: n, through }
                    if n.as_ref() == notebook && started <= *through && *through <= latest)
            });
            Some(HelpRequest {
                notebook: notebook.cloned(),
                started,
                latest,
                dismissed,
            })
        })
        .collect();
    requests.sort_by_key(|r| r.started);
    requests
}

fn significant_errors(
    ordered: &[&ActivityEvent],
    actions: &[InstructorAction],
    rules: &StatusRules,
) -> Vec<SignificantError> {
    // Per cell: the failures since the last success, newest last.
    let mut streaks: BTreeMap<&CellKey, (u32, Option<OrderKey>)> = BTreeMap::new();
    for event in ordered {
        if let Activity::Execution { cell, failed } = &event.activity {
            let resolved = actions.iter().any(|a| {
                matches!(a, InstructorAction::ResolveError { cell: c, through }
                    if c == cell && event.key <= *through)
            });
            let streak = streaks.entry(cell).or_insert((0, None));
            *streak = if *failed && !resolved {
                (streak.0 + 1, Some(event.key))
            } else {
                (0, None)
            };
        }
    }
    let threshold = u32::from(rules.consecutive_errors.get());
    streaks
        .into_iter()
        .filter_map(|(cell, (count, latest))| match latest {
            Some(latest) if count >= threshold => Some(SignificantError {
                cell: cell.clone(),
                consecutive_failures: count,
                latest,
            }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;
    use uuid::Uuid;

    use super::*;

    const T0: OffsetDateTime = datetime!(2026-04-01 10:00:00 UTC);

    fn id(n: u128) -> EventId {
        EventId::from_uuid(Uuid::from_u128(n))
    }

    fn notebook(name: &str) -> Option<NotebookPath> {
        Some(NotebookPath::parse(name).unwrap())
    }

    fn cell(name: &str) -> CellKey {
        CellKey {
            notebook: notebook("lesson1.ipynb"),
            cell: ClientId::parse(name).unwrap(),
        }
    }

    fn help() -> Activity {
        Activity::Help {
            notebook: notebook("lesson1.ipynb"),
        }
    }

    fn help_stop() -> Activity {
        Activity::HelpStop {
            notebook: notebook("lesson1.ipynb"),
        }
    }

    fn dismiss(through: &ActivityEvent) -> InstructorAction {
        let Activity::Help { notebook } = &through.activity else {
            panic!("dismissals name a help event");
        };
        InstructorAction::DismissHelp {
            notebook: notebook.clone(),
            through: through.key,
        }
    }

    fn at(secs: i64, n: u128, activity: Activity) -> ActivityEvent {
        ActivityEvent {
            key: OrderKey {
                time: T0 + Duration::seconds(secs),
                id: id(n),
            },
            activity,
        }
    }

    fn run(secs: i64, n: u128, cell_name: &str, failed: bool) -> ActivityEvent {
        at(
            secs,
            n,
            Activity::Execution {
                cell: cell(cell_name),
                failed,
            },
        )
    }

    fn status_at(
        events: &[ActivityEvent],
        actions: &[InstructorAction],
        secs: i64,
    ) -> StudentStatus {
        derive_status(
            events,
            actions,
            &StatusRules::default(),
            T0 + Duration::seconds(secs),
        )
    }

    #[test]
    fn no_events_is_idle() {
        let s = status_at(&[], &[], 0);
        assert_eq!(s.status, Status::Idle);
        assert_eq!(s.last_activity, None);
    }

    #[test]
    fn recent_activity_is_active_then_idle() {
        let events = [at(0, 1, Activity::Other)];
        assert_eq!(status_at(&events, &[], 299).status, Status::Active);
        assert_eq!(status_at(&events, &[], 300).status, Status::Active);
        assert_eq!(status_at(&events, &[], 301).status, Status::Idle);
    }

    fn heartbeats(from: i64, to: i64, first_id: u128) -> Vec<ActivityEvent> {
        (from..to)
            .map(|i| at(i * 10, first_id + (i - from) as u128, help()))
            .collect()
    }

    #[test]
    fn help_is_active_while_heartbeats_arrive() {
        let events = heartbeats(0, 5, 1);
        let s = status_at(&events, &[], 45);
        assert_eq!(s.status, Status::Help);
        assert_eq!(s.help.len(), 1);
        let request = &s.help[0];
        assert_eq!(request.started.id, id(1));
        assert_eq!(request.started.time, T0);
        assert_eq!(request.latest.time, T0 + Duration::seconds(40));
        assert!(!request.dismissed);
    }

    #[test]
    fn help_lapses_five_minutes_after_the_last_heartbeat() {
        let events = heartbeats(0, 2, 1);
        assert_eq!(status_at(&events, &[], 310).status, Status::Help);
        assert!(status_at(&events, &[], 311).help.is_empty());
    }

    #[test]
    fn help_stop_ends_help() {
        let events = [at(0, 1, help()), at(5, 2, help_stop())];
        assert!(status_at(&events, &[], 6).help.is_empty());
    }

    #[test]
    fn help_stop_older_than_the_window_does_not_matter() {
        let events = [at(0, 1, help_stop())];
        assert!(status_at(&events, &[], 1000).help.is_empty());
    }

    #[test]
    fn dismissal_sticks_through_heartbeats() {
        let mut events = heartbeats(0, 3, 1);
        let dismissals = [dismiss(&events[2])];
        // Heartbeats keep arriving after the dismissal, for 4 more minutes.
        events.extend(heartbeats(3, 27, 4));
        let s = status_at(&events, &dismissals, 265);
        assert_eq!(s.help.len(), 1);
        assert!(s.help[0].dismissed);
        assert_ne!(s.status, Status::Help);
    }

    #[test]
    fn a_late_earlier_heartbeat_does_not_undo_a_dismissal() {
        // The instructor saw heartbeats 2 and 3 and dismissed; heartbeat 1
        // (sent first, retried) arrives afterwards and becomes the start.
        let seen = [at(10, 2, help()), at(20, 3, help())];
        let dismissals = [dismiss(&seen[1])];
        let mut events = seen.to_vec();
        events.push(at(0, 1, help()));
        events.push(at(30, 4, help()));
        let s = status_at(&events, &dismissals, 31);
        assert_eq!(s.help[0].started.id, id(1));
        assert!(s.help[0].dismissed);
        assert_ne!(s.status, Status::Help);
    }

    #[test]
    fn a_new_request_after_help_stop_is_not_dismissed() {
        let events = [
            at(0, 1, help()),
            at(10, 2, help()),
            at(20, 3, help_stop()),
            at(30, 4, help()),
        ];
        let dismissals = [dismiss(&events[1])];
        let s = status_at(&events, &dismissals, 31);
        assert_eq!(s.status, Status::Help);
        assert_eq!(s.help[0].started.id, id(4));
        assert!(!s.help[0].dismissed);
    }

    #[test]
    fn a_new_request_after_a_long_silence_is_not_dismissed() {
        let events = [at(0, 1, help()), at(400, 2, help())];
        let dismissals = [dismiss(&events[0])];
        let s = status_at(&events, &dismissals, 401);
        assert_eq!(s.help[0].started.id, id(2));
        assert!(!s.help[0].dismissed);
    }

    #[test]
    fn help_is_tracked_per_notebook() {
        let other = |secs, n| {
            at(
                secs,
                n,
                Activity::Help {
                    notebook: notebook("lesson2.ipynb"),
                },
            )
        };
        let events = [
            at(0, 1, help()),
            other(1, 2),
            at(10, 3, help()),
            // Turning help off in lesson 2 leaves lesson 1's request alone.
            at(
                11,
                4,
                Activity::HelpStop {
                    notebook: notebook("lesson2.ipynb"),
                },
            ),
            at(20, 5, help()),
        ];
        let dismissals = [dismiss(&events[2])];
        let s = status_at(&events, &dismissals, 21);
        assert_eq!(s.help.len(), 1);
        assert_eq!(s.help[0].notebook, notebook("lesson1.ipynb"));
        assert!(
            s.help[0].dismissed,
            "lesson 2's help_stop must not reset lesson 1's request"
        );
        // A dismissal of one notebook's request leaves another's active.
        let both = [at(0, 1, help()), other(1, 2)];
        let s = status_at(&both, &[dismiss(&both[0])], 2);
        assert_eq!(s.help.len(), 2);
        assert_eq!(s.status, Status::Help);
    }

    #[test]
    fn three_failures_of_one_cell_are_significant() {
        let events = [
            run(0, 1, "a", true),
            run(10, 2, "a", true),
            run(20, 3, "a", true),
        ];
        let s = status_at(&events, &[], 21);
        assert_eq!(s.status, Status::SignificantError);
        assert_eq!(s.significant_errors.len(), 1);
        assert_eq!(s.significant_errors[0].consecutive_failures, 3);
        assert_eq!(s.significant_errors[0].latest.id, id(3));
        assert_eq!(s.failed_executions, 3);
    }

    #[test]
    fn two_failures_are_only_an_error() {
        let events = [run(0, 1, "a", true), run(10, 2, "a", true)];
        assert_eq!(status_at(&events, &[], 11).status, Status::Error);
    }

    #[test]
    fn failures_spread_over_cells_are_not_significant() {
        let events = [
            run(0, 1, "a", true),
            run(10, 2, "b", true),
            run(20, 3, "c", true),
        ];
        let s = status_at(&events, &[], 21);
        assert_eq!(s.status, Status::Error);
        assert!(s.significant_errors.is_empty());
    }

    #[test]
    fn a_success_in_between_resets_the_streak() {
        let events = [
            run(0, 1, "a", true),
            run(10, 2, "a", true),
            run(15, 9, "a", false),
            run(20, 3, "a", true),
        ];
        assert!(status_at(&events, &[], 21).significant_errors.is_empty());
    }

    #[test]
    fn a_later_success_clears_a_significant_error() {
        let events = [
            run(0, 1, "a", true),
            run(10, 2, "a", true),
            run(20, 3, "a", true),
            run(30, 4, "a", false),
        ];
        let s = status_at(&events, &[], 31);
        assert!(s.significant_errors.is_empty());
        assert_eq!(s.status, Status::Active);
    }

    #[test]
    fn resolution_clears_until_n_new_failures() {
        let mut events = vec![
            run(0, 1, "a", true),
            run(10, 2, "a", true),
            run(20, 3, "a", true),
        ];
        let through = events[2].key;
        let resolve = [InstructorAction::ResolveError {
            cell: cell("a"),
            through,
        }];
        assert!(
            status_at(&events, &resolve, 21)
                .significant_errors
                .is_empty()
        );
        events.push(run(30, 4, "a", true));
        events.push(run(40, 5, "a", true));
        assert!(
            status_at(&events, &resolve, 41)
                .significant_errors
                .is_empty()
        );
        events.push(run(50, 6, "a", true));
        assert_eq!(status_at(&events, &resolve, 51).significant_errors.len(), 1);
    }

    #[test]
    fn threshold_comes_from_the_class() {
        let rules = StatusRules {
            consecutive_errors: NonZeroU8::new(2).unwrap(),
            ..StatusRules::default()
        };
        let events = [run(0, 1, "a", true), run(10, 2, "a", true)];
        let s = derive_status(&events, &[], &rules, T0 + Duration::seconds(11));
        assert_eq!(s.status, Status::SignificantError);
    }

    #[test]
    fn help_outranks_errors() {
        let events = [
            run(0, 1, "a", true),
            run(10, 2, "a", true),
            run(20, 3, "a", true),
            at(25, 4, help()),
        ];
        let s = status_at(&events, &[], 26);
        assert_eq!(s.status, Status::Help);
        assert_eq!(s.significant_errors.len(), 1);
    }

    #[test]
    fn a_late_arriving_success_is_placed_by_event_time() {
        // Failures at 0, 20, 30 and a success at 10 that arrives last: the
        // trailing streak is 2, so no significant error, in any arrival order.
        let events = [
            run(0, 1, "a", true),
            run(20, 3, "a", true),
            run(30, 4, "a", true),
            run(10, 2, "a", false),
        ];
        let s = status_at(&events, &[], 31);
        assert!(s.significant_errors.is_empty());
        assert_eq!(s.status, Status::Error);
    }

    #[test]
    fn replays_count_once() {
        let events = [
            run(0, 1, "a", true),
            run(0, 1, "a", true),
            run(0, 1, "a", true),
        ];
        let s = status_at(&events, &[], 1);
        assert_eq!(s.executions, 1);
        assert!(s.significant_errors.is_empty());
    }

    #[test]
    fn same_id_at_two_times_keeps_the_earliest() {
        let a = run(0, 1, "a", false);
        let b = run(50, 1, "a", false);
        assert_eq!(canonical_order(&[b.clone(), a.clone()]), vec![&a]);
        assert_eq!(canonical_order(&[a.clone(), b]), vec![&a]);
    }

    #[test]
    fn status_order_is_urgency() {
        let mut all = [
            Status::Idle,
            Status::Active,
            Status::Help,
            Status::Error,
            Status::SignificantError,
        ];
        all.sort();
        assert_eq!(
            all,
            [
                Status::Help,
                Status::SignificantError,
                Status::Error,
                Status::Active,
                Status::Idle
            ]
        );
    }
}
