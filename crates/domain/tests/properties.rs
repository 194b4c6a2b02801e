//! Property tests: decoding inverts encoding, and derived status does not
//! depend on the order or multiplicity in which events are seen.

use cellmon_domain::status::{
    Activity, ActivityEvent, CellKey, InstructorAction, OrderKey, StatusRules, derive_status,
};
use cellmon_domain::{EventId, WireEvent, decode_batch, validate};
use proptest::prelude::*;
use proptest::sample::select;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

const T0: OffsetDateTime = datetime!(2026-04-01 10:00:00 UTC);

fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0..1e9f64,
        any::<f64>().prop_filter("finite", |f| f.is_finite())
    ]
}

fn wire_event() -> impl Strategy<Value = WireEvent> {
    let s = || proptest::option::of(any::<String>());
    (
        (s(), s(), s(), s(), s(), s()),
        (s(), s(), s(), proptest::option::of(any::<i64>()), s(), s()),
        (
            proptest::option::of(any::<i64>()),
            proptest::option::of(any::<bool>()),
            s(),
            s(),
            proptest::option::of(finite()),
            s(),
        ),
    )
        .prop_map(|(a, b, c)| WireEvent {
            event_id: a.0,
            event_type: a.1,
            event_time: a.2,
            email_address: a.3,
            user_name: a.4,
            team_name: a.5,
            session_id: b.0,
            notebook_path: b.1,
            cell_id: b.2,
            cell_index: b.3,
            cell_type: b.4,
            code: b.5,
            execution_count: c.0,
            has_error: c.1,
            error_message: c.2,
            result: c.3,
            execution_duration_ms: c.4,
            user_id: c.5,
        })
}

/// Wire events that are mostly valid, so validation round trips get exercised.
fn plausible_wire_event() -> impl Strategy<Value = WireEvent> {
    let text = "[a-zA-Z0-9あ-んチーム _./-]{1,40}";
    (
        select(vec![
            "cell_executed",
            "notebook_opened",
            "notebook_saved",
            "help",
            "help_stop",
            "custom_x",
        ]),
        proptest::option::of(any::<u128>()),
        proptest::option::of(0i64..4_000_000_000_000),
        "[a-z0-9.]{1,20}@[a-z]{1,10}\\.jp",
        (
            proptest::option::of(text),
            proptest::option::of(text),
            text,
            text,
        ),
        (
            proptest::option::of(0i64..1000),
            proptest::option::of(select(vec!["code", "markdown", "raw"])),
            proptest::option::of("\\PC{0,200}"),
            proptest::option::of(any::<bool>()),
            proptest::option::of("\\PC{0,80}"),
            proptest::option::of(0.0..1e6f64),
        ),
    )
        .prop_map(|(ty, id, millis, email, names, cell)| WireEvent {
            event_id: id.map(|n| Uuid::from_u128(n).to_string()),
            event_type: Some(ty.to_owned()),
            event_time: millis.map(|ms| {
                let t = OffsetDateTime::UNIX_EPOCH + Duration::milliseconds(ms);
                t.format(&time::format_description::well_known::Rfc3339)
                    .unwrap()
            }),
            email_address: Some(email),
            user_name: names.0,
            team_name: names.1,
            notebook_path: Some(names.2),
            cell_id: Some(names.3),
            cell_index: cell.0,
            cell_type: cell.1.map(str::to_owned),
            code: cell.2,
            has_error: cell.3,
            error_message: cell.4,
            execution_duration_ms: cell.5,
            ..WireEvent::default()
        })
}

proptest! {
    #[test]
    fn decode_inverts_encode(events in proptest::collection::vec(wire_event(), 0..5)) {
        let body = serde_json::to_vec(&events).unwrap();
        let decoded: Vec<WireEvent> = decode_batch(&body)
            .unwrap()
            .into_iter()
            .map(|item| WireEvent::from_item(item).unwrap())
            .collect();
        prop_assert_eq!(decoded, events);
    }

    #[test]
    fn single_object_decodes_like_an_array_of_one(event in wire_event()) {
        let body = serde_json::to_vec(&event).unwrap();
        let items = decode_batch(&body).unwrap();
        prop_assert_eq!(items.len(), 1);
        prop_assert_eq!(WireEvent::from_item(items[0]).unwrap(), event);
    }

    #[test]
    fn validation_round_trips_through_the_wire(wire in plausible_wire_event()) {
        if let Ok(event) = validate(wire, T0) {
            let again = validate(event.to_wire(), T0).unwrap();
            prop_assert_eq!(again, event);
        }
    }

    #[test]
    fn event_id_is_a_function_of_the_event(wire in wire_event()) {
        prop_assert_eq!(EventId::for_wire(&wire), EventId::for_wire(&wire.clone()));
    }
}

fn notebook(name: &str) -> Option<cellmon_domain::fields::NotebookPath> {
    Some(cellmon_domain::fields::NotebookPath::parse(name).unwrap())
}

fn activity_event() -> impl Strategy<Value = ActivityEvent> {
    let cells = vec!["a", "b"];
    let notebooks = || select(vec![None, notebook("n1.ipynb"), notebook("n2.ipynb")]);
    (
        0i64..900,
        1u128..40,
        prop_oneof![
            4 => (select(cells), any::<bool>()).prop_map(|(c, failed)| Activity::Execution {
                cell: CellKey {
                    notebook: notebook("n1.ipynb"),
                    cell: cellmon_domain::fields::ClientId::parse(c).unwrap(),
                },
                failed,
            }),
            2 => notebooks().prop_map(|notebook| Activity::Help { notebook }),
            1 => notebooks().prop_map(|notebook| Activity::HelpStop { notebook }),
            1 => Just(Activity::Other),
        ],
    )
        .prop_map(|(secs, id, activity)| ActivityEvent {
            // Ids determine times, as they do for real events, except that a
            // content-derived id may come back with a later receive time.
            key: OrderKey {
                time: T0 + Duration::seconds(secs),
                id: EventId::from_uuid(Uuid::from_u128(id)),
            },
            activity,
        })
}

/// A set of distinct events (one time and activity per id).
fn distinct_events() -> impl Strategy<Value = Vec<ActivityEvent>> {
    proptest::collection::vec(activity_event(), 0..40).prop_map(|mut events| {
        events.sort_by_key(|e| e.key.id);
        events.dedup_by_key(|e| e.key.id);
        events
    })
}

fn actions(events: &[ActivityEvent], pick: &[usize]) -> Vec<InstructorAction> {
    pick.iter()
        // Of no events, `get` picks none; the max only keeps `%` off 0.
        .filter_map(|&i| events.get(i % events.len().max(1)))
        .map(|e| match &e.activity {
            Activity::Execution { cell, .. } => InstructorAction::ResolveError {
                cell: cell.clone(),
                through: e.key,
            },
            Activity::Help { notebook } | Activity::HelpStop { notebook } => {
                InstructorAction::DismissHelp {
                    notebook: notebook.clone(),
                    through: e.key,
                }
            }
            Activity::Other => InstructorAction::DismissHelp {
                notebook: None,
                through: e.key,
            },
        })
        .collect()
}

proptest! {
    #[test]
    fn reordering_and_replaying_never_changes_status(
        (events, shuffled) in distinct_events().prop_flat_map(|events| {
            let original = Just(events.clone());
            // Replay a prefix (duplicates), then shuffle everything.
            let n = events.len();
            let replayed = (0..=n).prop_flat_map(move |k| {
                let mut with_dups = events.clone();
                with_dups.extend_from_slice(&events[..k]);
                Just(with_dups).prop_shuffle()
            });
            (original, replayed)
        }),
        pick in proptest::collection::vec(any::<usize>(), 0..3),
        now_secs in 0i64..1300,
        threshold in 1u8..5,
    ) {
        let rules = StatusRules {
            consecutive_errors: std::num::NonZeroU8::new(threshold).unwrap(),
            ..StatusRules::default()
        };
        let actions = actions(&events, &pick);
        let now = T0 + Duration::seconds(now_secs);
        prop_assert_eq!(
            derive_status(&events, &actions, &rules, now),
            derive_status(&shuffled, &actions, &rules, now)
        );
    }

    #[test]
    fn significant_errors_are_exactly_the_cells_with_n_trailing_failures(
        events in distinct_events(),
        threshold in 1u8..5,
    ) {
        let rules = StatusRules {
            consecutive_errors: std::num::NonZeroU8::new(threshold).unwrap(),
            ..StatusRules::default()
        };
        let status = derive_status(&events, &[], &rules, T0);
        let mut ordered = events.clone();
        ordered.sort_by_key(|e| e.key);
        // Recount from scratch: per cell, the failures since its last success.
        let mut trailing: std::collections::BTreeMap<CellKey, usize> = Default::default();
        for event in &ordered {
            if let Activity::Execution { cell, failed } = &event.activity {
                let count = trailing.entry(cell.clone()).or_default();
                *count = if *failed { *count + 1 } else { 0 };
            }
        }
        let expected: Vec<(CellKey, u32)> = trailing
            .into_iter()
            .filter(|(_, n)| *n >= usize::from(threshold))
            .map(|(cell, n)| (cell, n as u32))
            .collect();
        let got: Vec<(CellKey, u32)> = status
            .significant_errors
            .iter()
            .map(|alert| (alert.cell.clone(), alert.consecutive_failures))
            .collect();
        prop_assert_eq!(got, expected);
    }
}
