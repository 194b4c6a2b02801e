//! What simulated students do, and when: the arrival schedule of a load
//! phase.
//!
//! A student opens a notebook, then runs a cell every 12 to 18 s (uniform).
//! Some runs fail; after some failures the student is stuck on that cell for
//! a few more failing runs (which makes a significant error on dashboards)
//! and sometimes asks for help while stuck, re-sending `help` every 10 s as
//! the extension does, and `help_stop` once the cell works. Now and then a
//! student opens another notebook.
//!
//! Every choice comes from a per-student generator seeded from the run's
//! seed, so a schedule is reproducible, and the schedule is computed ahead of
//! the clock: it says when each event is due, whatever the server does.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use serde::Serialize;

/// Failing runs that follow the first failure of a stuck student, before
/// the cell works again (with N = 3 this makes a significant error).
const STUCK_RUNS: u32 = 2;

/// How simulated students behave.
#[derive(Debug, Clone, Serialize)]
pub struct Behaviour {
    /// Shortest time between two cell runs of a student.
    #[serde(with = "secs")]
    pub run_min: Duration,
    /// Longest time between two cell runs of a student.
    #[serde(with = "secs")]
    pub run_max: Duration,
    /// Share of all cell runs that fail, stuck runs included.
    pub failure_rate: f64,
    /// Chance that a failure leaves the student stuck on that cell.
    pub stuck_chance: f64,
    /// Chance that a stuck student asks for help.
    pub help_chance: f64,
    /// How often the extension re-sends `help` while the toggle is on.
    #[serde(with = "secs")]
    pub help_heartbeat: Duration,
    /// Chance per run of a new cell that the student opens another notebook.
    pub open_chance: f64,
    /// Cells per notebook.
    pub cells: u32,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            run_min: Duration::from_secs(12),
            run_max: Duration::from_secs(18),
            failure_rate: 0.15,
            stuck_chance: 0.25,
            help_chance: 0.4,
            help_heartbeat: Duration::from_secs(10),
            open_chance: 0.03,
            cells: 20,
        }
    }
}

impl Behaviour {
    /// The chance that a run of a fresh cell fails, such that all runs
    /// (stuck ones included) fail at `failure_rate`. A fresh failure turns
    /// into `1 + s·L` failures over `1 + s·(L+1)` runs (s the stuck chance,
    /// L the stuck runs), so the rate is p(1 + sL) / (1 + p·s(L+1)).
    fn fresh_failure_chance(&self) -> f64 {
        let (r, s, l) = (self.failure_rate, self.stuck_chance, f64::from(STUCK_RUNS));
        (r / (1.0 + s * l - r * s * (l + 1.0))).clamp(0.0, 1.0)
    }

    /// Mean events per second of one student (cell runs only).
    pub fn runs_per_second(&self) -> f64 {
        2.0 / (self.run_min + self.run_max).as_secs_f64()
    }
}

mod secs {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// One thing a student does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    OpenNotebook {
        notebook: u32,
    },
    RunCell {
        notebook: u32,
        cell: u32,
        fails: bool,
        /// 1, 2, 3, ... per student: what the student's status counts once
        /// this run is stored.
        execution: u32,
    },
    Help {
        notebook: u32,
    },
    HelpStop {
        notebook: u32,
    },
}

/// An action and when it is due, from the start of its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub at: Duration,
    pub student: u32,
    pub action: Action,
}

/// One simulated student.
#[derive(Debug)]
struct Student {
    rng: fastrand::Rng,
    open_at: Option<Duration>,
    run_at: Duration,
    beat_at: Option<Duration>,
    stop_at: Option<Duration>,
    notebook: u32,
    cell: u32,
    executions: u32,
    /// Failing runs still to come on the current cell.
    stuck_left: u32,
    /// The next run of the current cell works (the end of being stuck).
    recovering: bool,
    /// The student just opened a notebook; the next thing is a cell run.
    opened: bool,
}

impl Student {
    fn new(seed: u64, behaviour: &Behaviour) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        // Spread over one run interval, so a phase starts at its full rate.
        let start = uniform(&mut rng, Duration::ZERO, behaviour.run_max);
        let first_run = start + uniform(&mut rng, Duration::from_secs(1), Duration::from_secs(3));
        Self {
            rng,
            open_at: Some(start),
            run_at: first_run,
            beat_at: None,
            stop_at: None,
            notebook: 1,
            cell: 0,
            executions: 0,
            stuck_left: 0,
            recovering: false,
            opened: true,
        }
    }

    fn next_time(&self) -> Duration {
        [self.open_at, self.stop_at, self.beat_at, Some(self.run_at)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.run_at)
    }

    /// The student's next action, at [`Self::next_time`].
    fn next_action(&mut self, behaviour: &Behaviour) -> Action {
        let now = self.next_time();
        if self.open_at == Some(now) {
            self.open_at = None;
            return Action::OpenNotebook {
                notebook: self.notebook,
            };
        }
        if self.stop_at == Some(now) {
            self.stop_at = None;
            return Action::HelpStop {
                notebook: self.notebook,
            };
        }
        if self.beat_at == Some(now) {
            self.beat_at = Some(now + behaviour.help_heartbeat);
            return Action::Help {
                notebook: self.notebook,
            };
        }
        if self.stuck_left == 0
            && !self.recovering
            && !self.opened
            && self.rng.f64() < behaviour.open_chance
            && self.beat_at.is_none()
        {
            self.notebook += 1;
            self.cell = 0;
            self.run_at = now + Duration::from_secs(2);
            self.opened = true;
            return Action::OpenNotebook {
                notebook: self.notebook,
            };
        }
        self.run_cell(now, behaviour)
    }

    /// A cell run at `now`; the next one is 12 to 18 s later.
    fn run_cell(&mut self, now: Duration, behaviour: &Behaviour) -> Action {
        self.opened = false;
        let fails = if self.stuck_left > 0 {
            self.stuck_left -= 1;
            self.recovering = self.stuck_left == 0;
            true
        } else if self.recovering {
            self.recovering = false;
            if self.beat_at.take().is_some() {
                self.stop_at = Some(now + Duration::from_secs(1));
            }
            false
        } else {
            // At least 1 cell, as `LoadSpec` is checked.
            self.cell = self.cell % behaviour.cells + 1;
            let fails = self.rng.f64() < behaviour.fresh_failure_chance();
            if fails && self.rng.f64() < behaviour.stuck_chance {
                self.stuck_left = STUCK_RUNS;
                if self.rng.f64() < behaviour.help_chance {
                    self.beat_at = Some(now + Duration::from_secs(1));
                }
            }
            fails
        };
        self.executions += 1;
        self.run_at = now + uniform(&mut self.rng, behaviour.run_min, behaviour.run_max);
        Action::RunCell {
            notebook: self.notebook,
            cell: self.cell,
            fails,
            execution: self.executions,
        }
    }
}

fn uniform(rng: &mut fastrand::Rng, low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    low + (high - low).mul_f64(rng.f64())
}

/// Where a phase's arrivals come from.
#[derive(Debug)]
enum Source {
    /// Students acting on their own clocks.
    Class(BinaryHeap<Reverse<(Duration, u32)>>),
    /// A fixed rate of cell runs, round robin over the students.
    Rate { interval: Duration, next: u64 },
}

/// The arrivals of one phase, in time order, up to its duration.
#[derive(Debug)]
pub struct Schedule {
    behaviour: Behaviour,
    students: Vec<Student>,
    source: Source,
    duration: Duration,
}

impl Schedule {
    /// `students` simulated students over `duration`.
    pub fn class(behaviour: Behaviour, students: u32, duration: Duration, seed: u64) -> Self {
        let students: Vec<Student> = (0..students)
            .map(|n| Student::new(mix(seed, n), &behaviour))
            .collect();
        let heap = students
            .iter()
            .zip(0..)
            .map(|(s, n)| Reverse((s.next_time(), n)))
            .collect();
        Self {
            behaviour,
            students,
            source: Source::Class(heap),
            duration,
        }
    }

    /// `rate` cell runs per second over `students` students (at least 1,
    /// as `LoadSpec` is checked), evenly spaced.
    pub fn rate(
        behaviour: Behaviour,
        rate: f64,
        students: u32,
        duration: Duration,
        seed: u64,
    ) -> Self {
        let students = (0..students)
            .map(|n| Student::new(mix(seed, n), &behaviour))
            .collect();
        Self {
            behaviour,
            students,
            source: Source::Rate {
                interval: Duration::from_secs_f64(1.0 / rate.max(0.001)),
                next: 0,
            },
            duration,
        }
    }
}

impl Iterator for Schedule {
    type Item = Arrival;

    fn next(&mut self) -> Option<Arrival> {
        match &mut self.source {
            Source::Class(heap) => {
                let Reverse((at, n)) = heap.pop()?;
                if at >= self.duration {
                    heap.clear();
                    return None;
                }
                let student = &mut self.students[n as usize];
                let action = student.next_action(&self.behaviour);
                heap.push(Reverse((student.next_time(), n)));
                Some(Arrival {
                    at,
                    student: n,
                    action,
                })
            }
            Source::Rate { interval, next } => {
                let at = interval.mul_f64(*next as f64);
                if at >= self.duration {
                    return None;
                }
                let n = (*next % self.students.len() as u64) as u32;
                *next += 1;
                let action = self.students[n as usize].run_cell(at, &self.behaviour);
                Some(Arrival {
                    at,
                    student: n,
                    action,
                })
            }
        }
    }
}

/// A per-student seed (splitmix64 of the run's seed and the student).
fn mix(seed: u64, student: u32) -> u64 {
    let mut z = seed ^ (u64::from(student) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn class(students: u32, secs: u64) -> Vec<Arrival> {
        Schedule::class(Behaviour::default(), students, Duration::from_secs(secs), 7).collect()
    }

    #[test]
    fn arrivals_come_in_time_order_within_the_phase() {
        let arrivals = class(200, 120);
        assert!(arrivals.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(arrivals.iter().all(|a| a.at < Duration::from_secs(120)));
    }

    #[test]
    fn a_class_runs_a_cell_every_12_to_18_seconds_per_student() {
        let arrivals = class(500, 600);
        let mut runs: HashMap<u32, Vec<Duration>> = HashMap::new();
        for a in &arrivals {
            if let Action::RunCell { .. } = a.action {
                runs.entry(a.student).or_default().push(a.at);
            }
        }
        let gaps: Vec<Duration> = runs
            .values()
            .flat_map(|times| times.windows(2).map(|w| w[1] - w[0]))
            .collect();
        // A run after opening another notebook waits 2 s more.
        assert!(
            gaps.iter()
                .all(|g| *g >= Duration::from_secs(12) && *g <= Duration::from_secs(20))
        );
        let mean = gaps.iter().sum::<Duration>().as_secs_f64() / gaps.len() as f64;
        assert!((14.5..15.5).contains(&mean), "mean gap {mean}");
        // About 500 / 15 cell runs per second over the phase.
        let rate = runs.values().map(Vec::len).sum::<usize>() as f64 / 600.0;
        assert!((31.0..35.0).contains(&rate), "rate {rate}");
    }

    #[test]
    fn about_15_percent_of_runs_fail_and_some_students_get_stuck_and_ask_for_help() {
        let arrivals = class(1000, 600);
        let (mut runs, mut failed) = (0, 0);
        let mut streaks: HashMap<u32, u32> = HashMap::new();
        let mut stuck = 0;
        let mut help_students = std::collections::HashSet::new();
        let mut stops = 0;
        for a in &arrivals {
            match a.action {
                Action::RunCell { fails, .. } => {
                    runs += 1;
                    let streak = streaks.entry(a.student).or_default();
                    if fails {
                        failed += 1;
                        *streak += 1;
                        if *streak == 3 {
                            stuck += 1;
                        }
                    } else {
                        *streak = 0;
                    }
                }
                Action::Help { .. } => {
                    help_students.insert(a.student);
                }
                Action::HelpStop { .. } => stops += 1,
                Action::OpenNotebook { .. } => {}
            }
        }
        let rate = f64::from(failed) / f64::from(runs);
        assert!((0.13..0.17).contains(&rate), "failure rate {rate}");
        assert!(stuck > 50, "{stuck} significant errors");
        assert!(
            help_students.len() > 20,
            "{} asked for help",
            help_students.len()
        );
        assert!(stops > 0);
    }

    #[test]
    fn help_is_resent_every_10_seconds_until_help_stop() {
        let arrivals = class(300, 300);
        let mut last_help: HashMap<u32, Duration> = HashMap::new();
        let mut checked = 0;
        for a in &arrivals {
            match a.action {
                Action::Help { .. } => {
                    if let Some(previous) = last_help.insert(a.student, a.at) {
                        assert_eq!(a.at - previous, Duration::from_secs(10));
                        checked += 1;
                    }
                }
                Action::HelpStop { .. } => {
                    assert!(last_help.remove(&a.student).is_some(), "stop without help");
                }
                _ => {}
            }
        }
        assert!(checked > 10);
    }

    #[test]
    fn executions_count_up_per_student() {
        let mut seen: HashMap<u32, u32> = HashMap::new();
        for a in class(100, 200) {
            if let Action::RunCell { execution, .. } = a.action {
                let last = seen.entry(a.student).or_default();
                assert_eq!(execution, *last + 1);
                *last = execution;
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(class(50, 60), class(50, 60));
        let other: Vec<Arrival> =
            Schedule::class(Behaviour::default(), 50, Duration::from_secs(60), 8).collect();
        assert_ne!(class(50, 60), other);
    }

    #[test]
    fn a_fixed_rate_is_evenly_spaced() {
        let arrivals: Vec<Arrival> =
            Schedule::rate(Behaviour::default(), 200.0, 10, Duration::from_secs(3), 1).collect();
        assert_eq!(arrivals.len(), 600);
        assert_eq!(arrivals[1].at - arrivals[0].at, Duration::from_millis(5));
        assert_eq!(arrivals[599].at, Duration::from_millis(2995));
        assert_eq!(arrivals[13].student, 3);
    }
}
