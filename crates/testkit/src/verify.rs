//! The ledger check of RELIABILITY.md: what a client was told about each
//! event, against what each sink stored.
//!
//! For each sink (Postgres rows, InfluxDB points of the `event`
//! measurement), within one class:
//!
//! * lost = acknowledged − stored, must be empty;
//! * duplicates = ids stored more than once, must be empty;
//! * unexpected = stored − attempted (acknowledged, refused or unknown),
//!   must be empty;
//! * refused events that were stored anyway are reported too.
//!
//! Plus the agreement of the two sinks: events per (student, event type),
//! and every cell execution row with exactly one `cell_execution` point.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::influx::InfluxClient;

/// What the client learnt about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// 2xx: the server took responsibility for it.
    Ok,
    /// A definite refusal (4xx/5xx).
    Fail,
    /// No answer (timeout, reset): it may or may not be stored.
    Unknown,
}

/// One line of a ledger file (JSON Lines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub id: Uuid,
    pub outcome: Outcome,
}

/// Every event a client attempted, with its outcome. An id attempted more
/// than once keeps its best outcome (ok over unknown over fail).
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    outcomes: HashMap<Uuid, Outcome>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, id: Uuid, outcome: Outcome) {
        let rank = |o: Outcome| match o {
            Outcome::Ok => 2,
            Outcome::Unknown => 1,
            Outcome::Fail => 0,
        };
        self.outcomes
            .entry(id)
            .and_modify(|old| {
                if rank(outcome) > rank(*old) {
                    *old = outcome;
                }
            })
            .or_insert(outcome);
    }

    /// Adds every entry of `other`.
    pub fn merge(&mut self, other: Ledger) {
        for (id, outcome) in other.outcomes {
            self.record(id, outcome);
        }
    }

    pub fn ids(&self, outcome: Outcome) -> HashSet<Uuid> {
        self.outcomes
            .iter()
            .filter(|(_, o)| **o == outcome)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    /// Reads a JSON Lines ledger.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the ledger {}", path.display()))?;
        let mut ledger = Self::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let entry: LedgerEntry = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a ledger entry", path.display(), n + 1))?;
            ledger.record(entry.id, entry.outcome);
        }
        Ok(ledger)
    }

    /// Writes it as JSON Lines.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let mut out = String::with_capacity(self.outcomes.len() * 64);
        for (id, outcome) in &self.outcomes {
            out.push_str(&serde_json::to_string(&LedgerEntry {
                id: *id,
                outcome: *outcome,
            })?);
            out.push('\n');
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
    }
}

/// How often each id occurs.
fn occurrences(ids: &[Uuid]) -> HashMap<Uuid, usize> {
    let mut counts = HashMap::with_capacity(ids.len());
    for id in ids {
        *counts.entry(*id).or_default() += 1;
    }
    counts
}

/// The ids that `keep` accepts, sorted.
fn sorted<'a>(ids: impl IntoIterator<Item = &'a Uuid>, keep: impl Fn(&Uuid) -> bool) -> Vec<Uuid> {
    let mut out: Vec<Uuid> = ids.into_iter().filter(|id| keep(id)).copied().collect();
    out.sort();
    out
}

/// The ids that occur more than once, sorted.
fn repeated(counts: &HashMap<Uuid, usize>) -> Vec<Uuid> {
    sorted(counts.keys(), |id| counts[id] > 1)
}

/// The set check of one sink.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkCheck {
    /// Distinct ids stored.
    pub stored: usize,
    pub lost: Vec<Uuid>,
    pub duplicates: Vec<Uuid>,
    pub unexpected: Vec<Uuid>,
    /// Refused by the server and stored anyway.
    pub stored_though_refused: Vec<Uuid>,
}

impl SinkCheck {
    /// The set arithmetic, on the ids a sink holds (with repeats).
    pub fn compute(ledger: &Ledger, stored: &[Uuid]) -> Self {
        let counts = occurrences(stored);
        let acknowledged = ledger.ids(Outcome::Ok);
        Self {
            stored: counts.len(),
            lost: sorted(&acknowledged, |id| !counts.contains_key(id)),
            duplicates: repeated(&counts),
            unexpected: sorted(counts.keys(), |id| !ledger.outcomes.contains_key(id)),
            stored_though_refused: sorted(counts.keys(), |id| {
                ledger.outcomes.get(id) == Some(&Outcome::Fail)
            }),
        }
    }

    /// The standard pass: nothing lost, nothing twice, nothing unexpected.
    pub fn passes(&self) -> bool {
        self.lost.is_empty() && self.duplicates.is_empty() && self.unexpected.is_empty()
    }
}

/// Cell executions: Postgres rows against InfluxDB `cell_execution` points.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionCheck {
    pub rows: usize,
    pub points: usize,
    /// In Postgres, no point in InfluxDB.
    pub missing: Vec<Uuid>,
    /// More than one point.
    pub duplicates: Vec<Uuid>,
    /// A point without a Postgres row.
    pub extra: Vec<Uuid>,
}

impl ExecutionCheck {
    pub fn compute(rows: &[Uuid], points: &[Uuid]) -> Self {
        let rows: HashSet<Uuid> = rows.iter().copied().collect();
        let counts = occurrences(points);
        Self {
            rows: rows.len(),
            points: counts.len(),
            missing: sorted(&rows, |id| !counts.contains_key(id)),
            duplicates: repeated(&counts),
            extra: sorted(counts.keys(), |id| !rows.contains(id)),
        }
    }

    pub fn passes(&self) -> bool {
        self.missing.is_empty() && self.duplicates.is_empty() && self.extra.is_empty()
    }
}

/// The whole verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub acknowledged: usize,
    pub refused: usize,
    pub unknown: usize,
    pub postgres: SinkCheck,
    pub influx: SinkCheck,
    /// (student, event type) groups whose counts differ: (pg, influx).
    pub disagreements: BTreeMap<String, (u64, u64)>,
    /// How many (student, event type) groups were compared.
    pub groups: usize,
    pub executions: ExecutionCheck,
}

impl Verdict {
    pub fn passes(&self) -> bool {
        self.postgres.passes()
            && self.influx.passes()
            && self.disagreements.is_empty()
            && self.executions.passes()
    }

    /// Agreement of the sinks, in percent of groups.
    pub fn agreement_percent(&self) -> f64 {
        if self.groups == 0 {
            return 100.0;
        }
        100.0 * (self.groups - self.disagreements.len()) as f64 / self.groups as f64
    }

    /// A short human-readable summary.
    pub fn summary(&self) -> String {
        let sink = |name: &str, c: &SinkCheck| {
            format!(
                "{name}: stored {} lost {} duplicates {} unexpected {}{}",
                c.stored,
                c.lost.len(),
                c.duplicates.len(),
                c.unexpected.len(),
                if c.stored_though_refused.is_empty() {
                    String::new()
                } else {
                    format!(" (stored though refused {})", c.stored_though_refused.len())
                }
            )
        };
        format!(
            "ledger: ok {} refused {} unknown {}\n{}\n{}\nagreement pg/influx per student and event type: {:.2}% of {} groups ({} differ)\ncell executions: {} rows, {} points, missing {} duplicates {} extra {}\nverdict: {}",
            self.acknowledged,
            self.refused,
            self.unknown,
            sink("postgres", &self.postgres),
            sink("influxdb", &self.influx),
            self.agreement_percent(),
            self.groups,
            self.disagreements.len(),
            self.executions.rows,
            self.executions.points,
            self.executions.missing.len(),
            self.executions.duplicates.len(),
            self.executions.extra.len(),
            if self.passes() { "PASS" } else { "FAIL" }
        )
    }
}

/// What one sink holds for a class: ids (with repeats) and per-group counts.
#[derive(Debug, Clone, Default)]
pub struct SinkContents {
    pub ids: Vec<Uuid>,
    /// The student of each of `ids`, in the same order.
    pub students: Vec<String>,
    pub groups: BTreeMap<String, u64>,
    /// Ids of cell executions (rows, or `cell_execution` points).
    pub executions: Vec<Uuid>,
}

impl SinkContents {
    /// Keeps the events and groups of the students `keep` accepts; returns
    /// the ids kept.
    fn limit_to(&mut self, keep: impl Fn(&str) -> bool) -> HashSet<Uuid> {
        let mut kept = HashSet::new();
        let (ids, students) = (
            std::mem::take(&mut self.ids),
            std::mem::take(&mut self.students),
        );
        for (id, student) in ids.into_iter().zip(students) {
            if keep(&student) {
                kept.insert(id);
                self.ids.push(id);
                self.students.push(student);
            }
        }
        self.groups
            .retain(|key, _| keep(key.split(" / ").next().unwrap_or_default()));
        kept
    }
}

fn group_key(student: &str, event_type: &str) -> String {
    format!("{student} / {event_type}")
}

/// The events Postgres holds for `class` (all classes when `None`).
pub async fn postgres_contents(pool: &PgPool, class: Option<Uuid>) -> anyhow::Result<SinkContents> {
    let rows = sqlx::query(
        "SELECT e.event_id, s.student_key, e.event_type
         FROM events e JOIN students s ON s.id = e.student_id
         WHERE $1::uuid IS NULL OR e.class_id = $1",
    )
    .bind(class)
    .fetch_all(pool)
    .await?;
    let mut contents = SinkContents {
        executions: sqlx::query_scalar(
            "SELECT x.event_id FROM cell_executions x JOIN events e ON e.event_id = x.event_id
             WHERE $1::uuid IS NULL OR e.class_id = $1",
        )
        .bind(class)
        .fetch_all(pool)
        .await?,
        ..SinkContents::default()
    };
    for row in rows {
        contents.ids.push(row.try_get("event_id")?);
        let student: String = row.try_get("student_key")?;
        let kind: String = row.try_get("event_type")?;
        *contents
            .groups
            .entry(group_key(&student, &kind))
            .or_default() += 1;
        contents.students.push(student);
    }
    Ok(contents)
}

/// The `event` points InfluxDB holds for `class` (all when `None`).
pub async fn influx_contents(
    influx: &InfluxClient,
    database: &str,
    class: Option<Uuid>,
) -> anyhow::Result<SinkContents> {
    let filter = class
        .map(|c| format!(" WHERE \"class\" = '{c}'"))
        .unwrap_or_default();
    let body = influx
        .query(
            Some(database),
            &format!("SELECT \"event_id\", \"student\", \"event_type\" FROM \"event\"{filter}"),
        )
        .await?;
    let mut contents = SinkContents::default();
    let executions = influx
        .query(
            Some(database),
            &format!("SELECT \"event_id\" FROM \"cell_execution\"{filter}"),
        )
        .await?;
    for s in executions["results"][0]["series"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for value in s["values"].as_array().into_iter().flatten() {
            let id = value[1].as_str().unwrap_or_default();
            contents.executions.push(
                id.parse()
                    .with_context(|| format!("event_id {id:?} in InfluxDB is not a UUID"))?,
            );
        }
    }
    let Some(series) = body["results"][0]["series"].as_array() else {
        return Ok(contents);
    };
    for s in series {
        let columns: Vec<&str> = s["columns"]
            .as_array()
            .map(|c| c.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let at = |name: &str| columns.iter().position(|c| *c == name);
        let (Some(id_at), Some(student_at), Some(kind_at)) =
            (at("event_id"), at("student"), at("event_type"))
        else {
            anyhow::bail!("unexpected InfluxDB answer: {s}");
        };
        for value in s["values"].as_array().into_iter().flatten() {
            let id = value[id_at].as_str().unwrap_or_default();
            contents.ids.push(
                id.parse()
                    .with_context(|| format!("event_id {id:?} in InfluxDB is not a UUID"))?,
            );
            let student = value[student_at].as_str().unwrap_or_default();
            let kind = value[kind_at].as_str().unwrap_or_default();
            *contents.groups.entry(group_key(student, kind)).or_default() += 1;
            contents.students.push(student.to_owned());
        }
    }
    Ok(contents)
}

/// Checks both sinks against the ledger.
pub fn verdict(ledger: &Ledger, pg: &SinkContents, influx: &SinkContents) -> Verdict {
    let mut disagreements = BTreeMap::new();
    let keys: HashSet<&String> = pg.groups.keys().chain(influx.groups.keys()).collect();
    for key in &keys {
        let a = pg.groups.get(*key).copied().unwrap_or(0);
        let b = influx.groups.get(*key).copied().unwrap_or(0);
        if a != b {
            disagreements.insert((*key).clone(), (a, b));
        }
    }
    Verdict {
        acknowledged: ledger.ids(Outcome::Ok).len(),
        refused: ledger.ids(Outcome::Fail).len(),
        unknown: ledger.ids(Outcome::Unknown).len(),
        postgres: SinkCheck::compute(ledger, &pg.ids),
        influx: SinkCheck::compute(ledger, &influx.ids),
        disagreements,
        groups: keys.len(),
        executions: ExecutionCheck::compute(&pg.executions, &influx.executions),
    }
}

/// Reads both sinks and checks them.
pub async fn verify(
    ledger: &Ledger,
    pool: &PgPool,
    influx: &InfluxClient,
    influx_database: &str,
    class: Option<Uuid>,
) -> anyhow::Result<Verdict> {
    verify_students(ledger, pool, influx, influx_database, class, None).await
}

/// [`verify`], limited to the students whose key contains `students` (a
/// load run's own students, in a class that holds other events too).
pub async fn verify_students(
    ledger: &Ledger,
    pool: &PgPool,
    influx: &InfluxClient,
    influx_database: &str,
    class: Option<Uuid>,
    students: Option<&str>,
) -> anyhow::Result<Verdict> {
    let mut pg = postgres_contents(pool, class).await?;
    let mut points = influx_contents(influx, influx_database, class).await?;
    if let Some(marker) = students {
        let (pg_ids, influx_ids) = (
            pg.limit_to(|student| student.contains(marker)),
            points.limit_to(|student| student.contains(marker)),
        );
        let ids: HashSet<Uuid> = pg_ids.union(&influx_ids).copied().collect();
        pg.executions.retain(|id| ids.contains(id));
        points.executions.retain(|id| ids.contains(id));
    }
    Ok(verdict(ledger, &pg, &points))
}

/// [`verify`] until it passes or `wait` has passed (the sinks may still be
/// catching up), saying how far they are once a second.
pub async fn verify_until(
    ledger: &Ledger,
    pool: &PgPool,
    influx: &InfluxClient,
    influx_database: &str,
    class: Option<Uuid>,
    students: Option<&str>,
    wait: std::time::Duration,
) -> anyhow::Result<Verdict> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let verdict =
            verify_students(ledger, pool, influx, influx_database, class, students).await?;
        if verdict.passes() || std::time::Instant::now() >= deadline {
            return Ok(verdict);
        }
        eprintln!(
            "  waiting for the sinks: postgres {} / influxdb {} of {} acknowledged",
            verdict.acknowledged - verdict.postgres.lost.len(),
            verdict.acknowledged - verdict.influx.lost.len(),
            verdict.acknowledged
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn set_arithmetic() {
        let mut ledger = Ledger::new();
        ledger.record(id(1), Outcome::Ok);
        ledger.record(id(2), Outcome::Ok);
        ledger.record(id(3), Outcome::Unknown);
        ledger.record(id(4), Outcome::Fail);
        ledger.record(id(5), Outcome::Unknown);
        // A retry that succeeded makes the id acknowledged.
        ledger.record(id(5), Outcome::Ok);
        ledger.record(id(5), Outcome::Fail);
        let stored = [id(1), id(1), id(3), id(4), id(9), id(5)];
        let check = SinkCheck::compute(&ledger, &stored);
        assert_eq!(check.stored, 5);
        assert_eq!(check.lost, vec![id(2)]);
        assert_eq!(check.duplicates, vec![id(1)]);
        assert_eq!(check.unexpected, vec![id(9)]);
        assert_eq!(check.stored_though_refused, vec![id(4)]);
        assert!(!check.passes());
        // Unknown events may be stored or not.
        let check = SinkCheck::compute(&ledger, &[id(1), id(2), id(5)]);
        assert!(check.passes(), "{check:?}");
    }

    #[test]
    fn a_run_is_checked_on_its_own_students_only() {
        let mut ledger = Ledger::new();
        ledger.record(id(1), Outcome::Ok);
        ledger.record(id(2), Outcome::Ok);
        let contents = |ids: &[(u128, &str)]| {
            let mut c = SinkContents::default();
            for (n, student) in ids {
                c.ids.push(id(*n));
                c.students.push((*student).to_owned());
                *c.groups.entry(group_key(student, "help")).or_default() += 1;
            }
            c.executions = c.ids.clone();
            c
        };
        // Another client's event (7) in the same class, and a twice-stored
        // event of this run (2).
        let stored = [
            (1, "rabcp0s1"),
            (7, "someone"),
            (2, "rabcp1s4"),
            (2, "rabcp1s4"),
        ];
        let (mut pg, mut influx) = (contents(&stored), contents(&stored[..3]));
        let whole = verdict(&ledger, &pg, &influx);
        assert_eq!(whole.postgres.unexpected, vec![id(7)]);
        let kept = pg.limit_to(|s| s.contains("rabcp"));
        influx.limit_to(|s| s.contains("rabcp"));
        assert_eq!(kept, HashSet::from([id(1), id(2)]));
        pg.executions.retain(|i| kept.contains(i));
        influx.executions.retain(|i| kept.contains(i));
        let scoped = verdict(&ledger, &pg, &influx);
        assert!(scoped.postgres.unexpected.is_empty());
        // Scoping hides nothing of the run's own: the duplicate stays.
        assert_eq!(scoped.postgres.duplicates, vec![id(2)]);
        assert!(scoped.influx.passes());
        assert_eq!(scoped.groups, 2);
        assert!(!scoped.passes());
    }

    #[test]
    fn agreement_counts_groups() {
        let ledger = Ledger::new();
        let mut pg = SinkContents::default();
        let mut influx = SinkContents::default();
        pg.groups.insert("a / help".into(), 2);
        pg.groups.insert("b / help".into(), 1);
        influx.groups.insert("a / help".into(), 2);
        influx.groups.insert("c / help".into(), 1);
        let v = verdict(&ledger, &pg, &influx);
        assert_eq!(v.groups, 3);
        assert_eq!(v.disagreements.len(), 2);
        assert!((v.agreement_percent() - 100.0 / 3.0).abs() < 1e-9);
        assert!(!v.passes());
    }

    #[test]
    fn executions_are_matched_one_to_one() {
        let check = ExecutionCheck::compute(&[id(1), id(2), id(3)], &[id(1), id(1), id(3), id(4)]);
        assert_eq!(check.missing, vec![id(2)]);
        assert_eq!(check.duplicates, vec![id(1)]);
        assert_eq!(check.extra, vec![id(4)]);
        assert!(!check.passes());
        assert!(ExecutionCheck::compute(&[id(1)], &[id(1)]).passes());
    }

    #[test]
    fn ledger_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("ledger-{}", Uuid::new_v4()));
        let mut ledger = Ledger::new();
        ledger.record(id(7), Outcome::Unknown);
        ledger.record(id(8), Outcome::Ok);
        ledger.write(&dir).unwrap();
        let back = Ledger::read(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(back.ids(Outcome::Ok), HashSet::from([id(8)]));
        assert_eq!(back.ids(Outcome::Unknown), HashSet::from([id(7)]));
    }
}
