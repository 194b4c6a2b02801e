//! `harness load`: a simulated class over real HTTP, in staged phases, with
//! the server watched while it runs.
//!
//! Each phase is an arrival schedule ([`behaviour`]) played open-loop
//! ([`dispatch`]): students run cells, fail, get stuck, ask for help, open
//! notebooks; or, for a fixed target rate, cell runs evenly spaced. Every
//! event goes in its own request, as the extension sends it, from one of
//! many loopback addresses (a class's machines). Per phase the run records
//! offered and achieved events/s, accept latency (HDR), answers by status,
//! and the end-to-end latency from POST to a real instructor socket
//! ([`subscriber`]); once a second it reads the server's CPU, memory and
//! backend connections ([`sampler`]). Every event and its outcome goes in a
//! ledger for `harness verify`.
//!
//! The default ramp is 10, 25, 50, 75 and 100 students, then 250, 500,
//! 1000, 2500, ... until a phase misses the targets or the bound is
//! reached.

pub mod behaviour;
pub mod dispatch;
pub mod sampler;
pub mod stats;
pub mod subscriber;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use self::behaviour::{Action, Arrival, Behaviour, Schedule};
use self::sampler::{Sample, Sampler, SamplerSpec};
pub use self::stats::Percentiles;
use self::stats::{PhaseTally, Timeline};
use self::subscriber::{GatewaySpec, Pending};
use cellmon_testkit::verify::{Ledger, Outcome};

/// One phase of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseSpec {
    /// This many simulated students.
    Students(u32),
    /// A fixed rate of cell runs, spread over `students`.
    Rate { events_per_s: f64, students: u32 },
}

impl PhaseSpec {
    pub fn label(&self) -> String {
        match self {
            Self::Students(n) => format!("{n} students"),
            Self::Rate { events_per_s, .. } => format!("{events_per_s} events/s"),
        }
    }
}

/// The targets a phase must meet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Targets {
    /// Accept latency p95, ms.
    pub p95_ms: f64,
    /// Refused or unanswered share of events.
    pub max_error_rate: f64,
    /// The run must reach this many events/s in a phase that met the other
    /// targets.
    pub min_events_per_s: Option<f64>,
}

impl Default for Targets {
    fn default() -> Self {
        Self {
            p95_ms: 500.0,
            max_error_rate: 0.001,
            min_events_per_s: None,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The events URL, with `?token=` when needed.
    pub events_url: String,
    pub phases: Vec<PhaseSpec>,
    /// After the listed phases, keep adding students (250, 500, 1000, 2500,
    /// ...) until a phase misses the targets or `max_students` is passed.
    pub ramp: bool,
    pub max_students: u32,
    pub phase_duration: Duration,
    /// Quiet time after each phase, for late answers and socket updates.
    pub settle: Duration,
    /// After the last phase, how long to wait for cell runs still on their
    /// way to the instructor's socket.
    pub socket_wait: Duration,
    pub behaviour: Behaviour,
    /// Most requests in flight at once.
    pub max_in_flight: usize,
    /// Client addresses (127.0.1.1, 127.0.1.2, ...) the requests come from.
    pub clients: u8,
    /// Most events the whole run sends.
    pub max_events: u64,
    pub targets: Targets,
    /// The instructor's socket for end-to-end latency.
    pub gateway: Option<GatewaySpec>,
    pub sampler: SamplerSpec,
    pub seed: u64,
    /// Show a progress bar (when stderr is a terminal; otherwise a line
    /// every few seconds).
    pub progress: bool,
}

impl LoadSpec {
    /// Refuses, before anything starts, what would make a run hang or mean
    /// nothing, so nothing past it clamps: counts of 0 (the flag that sets
    /// each is named) and a run without phases.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.phases.is_empty(), "no phases to run");
        anyhow::ensure!(
            self.clients > 0,
            "clients (--clients) must be at least 1: requests need an address to come from"
        );
        anyhow::ensure!(
            self.max_in_flight > 0,
            "max_in_flight (--max-in-flight) must be at least 1: with 0 nothing is ever sent"
        );
        anyhow::ensure!(
            self.behaviour.cells > 0,
            "behaviour.cells must be at least 1: students run cells of a notebook"
        );
        for phase in &self.phases {
            let students = match *phase {
                PhaseSpec::Students(n) | PhaseSpec::Rate { students: n, .. } => n,
            };
            anyhow::ensure!(
                students > 0,
                "a phase needs at least 1 student (--students, --rate-students)"
            );
        }
        Ok(())
    }
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            events_url: String::new(),
            phases: [10, 25, 50, 75, 100]
                .into_iter()
                .map(PhaseSpec::Students)
                .collect(),
            ramp: true,
            max_students: 200_000,
            phase_duration: Duration::from_secs(20),
            settle: Duration::from_secs(2),
            socket_wait: Duration::from_secs(60),
            behaviour: Behaviour::default(),
            max_in_flight: 2048,
            clients: 100,
            max_events: 5_000_000,
            targets: Targets::default(),
            gateway: None,
            sampler: SamplerSpec::default(),
            seed: 1,
            progress: true,
        }
    }
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub index: usize,
    pub label: String,
    pub spec: PhaseSpec,
    /// Seconds from the run's start.
    pub start_s: f64,
    pub duration_s: f64,
    pub offered_events_per_s: f64,
    pub achieved_events_per_s: f64,
    pub events: u64,
    pub accepted: u64,
    pub failed: u64,
    pub error_rate: f64,
    /// Arrivals that waited for the in-flight cap.
    pub late_starts: u64,
    pub statuses: BTreeMap<String, u64>,
    pub accept_latency_ms: Percentiles,
    /// POST to instructor socket, for cell runs.
    pub end_to_end_ms: Option<Percentiles>,
    pub end_to_end_seen: u64,
    /// Mean over the phase, percent of one core.
    pub cpu_percent: BTreeMap<String, f64>,
    /// Most over the phase.
    pub rss_mib: BTreeMap<String, f64>,
    /// Most over the phase.
    pub connections: BTreeMap<String, u64>,
    pub met_targets: bool,
}

/// A whole run's raw results (the report adds the verdict).
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Part of every simulated student's e-mail address: the ledger check
    /// looks at these students only.
    pub student_marker: String,
    pub phases: Vec<PhaseResult>,
    pub timeline: Vec<stats::Second>,
    pub samples: Vec<Sample>,
    /// Cell runs never seen on the instructor's socket.
    pub end_to_end_unseen: u64,
    /// Resyncs and reconnections of the instructor's socket.
    pub socket: subscriber::Followed,
    pub wall_s: f64,
}

/// Whether `url` points at this machine (`harness load` sends from
/// loopback addresses only, and never loads anyone else's server).
pub fn is_loopback_url(url: &str) -> bool {
    let Some(rest) = url.split("://").nth(1) else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The next ramp step after `n` students: 1, 2.5, 5 per decade.
pub fn next_step(n: u32) -> u32 {
    let mut decade = 1u64;
    loop {
        for step in [10, 25, 50] {
            let candidate = decade * step / 10;
            if candidate > u64::from(n) {
                return u32::try_from(candidate).unwrap_or(u32::MAX);
            }
        }
        decade *= 10;
    }
}

/// What the e-mail addresses of one run's students contain.
fn student_marker(run: &str) -> String {
    format!("r{run}p")
}

/// The simulated student's e-mail address.
fn email(run: &str, phase: usize, student: u32) -> String {
    format!("r{run}p{phase}s{student}@example.ac.jp")
}

/// The event an arrival sends, in the extension's wire format.
pub fn event_json(run: &str, phase: usize, arrival: &Arrival, id: uuid::Uuid, now: &str) -> String {
    let student = arrival.student;
    let mut event = serde_json::json!({
        "eventId": id,
        "eventTime": now,
        "emailAddress": email(run, phase, student),
        "userName": format!("学生 {student}"),
        "teamName": format!("チーム{}", student % 12 + 1),
    });
    let notebook_path = |n: u32| format!("lesson{n}/exercise.ipynb");
    let fields = match arrival.action {
        Action::OpenNotebook { notebook } => serde_json::json!({
            "eventType": "notebook_opened",
            "notebookPath": notebook_path(notebook),
        }),
        Action::Help { notebook } => serde_json::json!({
            "eventType": "help",
            "notebookPath": notebook_path(notebook),
        }),
        Action::HelpStop { notebook } => serde_json::json!({
            "eventType": "help_stop",
            "notebookPath": notebook_path(notebook),
        }),
        Action::RunCell {
            notebook,
            cell,
            fails,
            execution,
        } => {
            let mut run = serde_json::json!({
                "eventType": "cell_executed",
                "notebookPath": notebook_path(notebook),
                "cellId": format!("cell-{cell}"),
                "cellIndex": cell,
                "cellType": "code",
                "code": format!("import numpy as np\nx = np.arange({cell} * 10)\nprint(x.sum() / len(x))"),
                "executionCount": execution,
                "hasError": fails,
                "executionDurationMs": 12.5,
            });
            if fails {
                run["errorMessage"] = "NameError: name 'x' is not defined".into();
            } else {
                run["result"] = "4.5".into();
            }
            run
        }
    };
    if let (Some(event), serde_json::Value::Object(fields)) = (event.as_object_mut(), fields) {
        event.extend(fields);
    }
    format!("[{event}]")
}

/// What the answers of requests record, under one lock.
#[derive(Debug, Default)]
struct Records {
    /// Per phase.
    tallies: Vec<PhaseTally>,
    timeline: Timeline,
    ledger: Ledger,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A worker that panicked mid-update leaves counts that are still counts.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs the phases; returns the results and the ledger of every event.
pub async fn run(spec: &LoadSpec) -> anyhow::Result<(RunResult, Ledger)> {
    spec.check()?;
    let run_id = format!("{:06x}", fastrand::u32(..0x100_0000));
    let clients: Vec<reqwest::Client> = (1..=spec.clients)
        .map(|k| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .no_proxy()
                .local_address(std::net::IpAddr::from([127, 0, 1, k]))
                .build()
        })
        .collect::<Result<_, _>>()?;
    let records = Arc::new(Mutex::new(Records::default()));
    let pending = Arc::new(Mutex::new(Pending::default()));
    let started = Instant::now();
    let (stop, stopped) = tokio::sync::watch::channel(false);

    // The server side, once a second.
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampling = {
        let samples = Arc::clone(&samples);
        let mut sampler = Sampler::new(spec.sampler.clone(), started.into_std());
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = subscriber::stopped(&mut stopped) => return,
                }
                let sample = sampler.sample();
                lock(&samples).push(sample);
            }
        })
    };
    // The instructor's socket.
    let following = match &spec.gateway {
        Some(gateway) => {
            // Fail now, with the reason, rather than report no latency.
            let socket = subscriber::connect(gateway).await.map_err(|e| {
                anyhow::anyhow!("cannot follow the class on {}: {e:#}", gateway.url)
            })?;
            Some(tokio::spawn(subscriber::follow(
                gateway.clone(),
                socket,
                Arc::clone(&pending),
                stopped.clone(),
            )))
        }
        None => None,
    };

    let mut phases = Vec::new();
    let mut queue: std::collections::VecDeque<PhaseSpec> = spec.phases.iter().copied().collect();
    let listed = queue.len();
    let mut sent_total = 0u64;
    while let Some(phase_spec) = queue.pop_front() {
        let index = phases.len();
        lock(&records).tallies.push(PhaseTally::default());
        let seed = spec.seed.wrapping_add(index as u64);
        let schedule = match phase_spec {
            PhaseSpec::Students(n) => {
                Schedule::class(spec.behaviour.clone(), n, spec.phase_duration, seed)
            }
            PhaseSpec::Rate {
                events_per_s,
                students,
            } => Schedule::rate(
                spec.behaviour.clone(),
                events_per_s,
                students,
                spec.phase_duration,
                seed,
            ),
        };
        let phase_start = Instant::now();
        let progress = Progress::start(spec, index, &phase_spec, Arc::clone(&records), phase_start);
        let limit = spec.max_events.saturating_sub(sent_total);
        let done = dispatch::dispatch(
            phase_start,
            schedule,
            spec.max_in_flight,
            limit,
            |arrival, scheduled| {
                let id = uuid::Uuid::new_v4();
                let body = event_json(&run_id, index, &arrival, id, &crate::now_rfc3339());
                // Runs are only tracked when a socket will see them.
                let run = match arrival.action {
                    Action::RunCell { execution, .. } if spec.gateway.is_some() => {
                        let email = email(&run_id, index, arrival.student);
                        lock(&pending).sent(&email, execution, index, scheduled);
                        Some((email, execution))
                    }
                    _ => None,
                };
                lock(&records).timeline.offered(scheduled - started);
                let http = clients[arrival.student as usize % clients.len()].clone();
                let url = spec.events_url.clone();
                let (records, pending) = (Arc::clone(&records), Arc::clone(&pending));
                async move {
                    let result = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await;
                    let status = match result {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let _ = response.bytes().await;
                            Some(status)
                        }
                        Err(_) => None,
                    };
                    let answered = Instant::now();
                    let accepted = status.is_some_and(|s| (200..300).contains(&s));
                    let outcome = match status {
                        None => Outcome::Unknown,
                        Some(_) if accepted => Outcome::Ok,
                        Some(_) => Outcome::Fail,
                    };
                    {
                        let mut records = lock(&records);
                        if let Some(tally) = records.tallies.get_mut(index) {
                            tally.answer(status, answered - scheduled, answered - phase_start);
                        }
                        records.timeline.answered(answered - started, accepted);
                        records.ledger.record(id, outcome);
                    }
                    if let (false, Some((email, execution))) = (accepted, &run) {
                        lock(&pending).forget(email, *execution);
                    }
                }
            },
        )
        .await;
        sent_total += done.started;
        let dispatched = phase_start.elapsed();
        tokio::time::sleep(spec.settle).await;
        progress.finish();

        let tally = lock(&records).tallies[index].clone();
        let duration = spec
            .phase_duration
            .min(dispatched.max(Duration::from_millis(1)));
        let result = phase_result(
            index,
            phase_spec,
            &tally,
            done.late,
            (phase_start - started).as_secs_f64(),
            duration,
            &lock(&samples),
            &spec.targets,
        );
        let met = result.met_targets;
        eprintln!("{}", phase_line(&result));
        phases.push(result);
        if sent_total >= spec.max_events {
            eprintln!(
                "stopping: the bound of {} events is reached",
                spec.max_events
            );
            break;
        }
        if !met && index + 1 >= listed {
            // A ramp ends at its first miss; listed phases all run.
            break;
        }
        if queue.is_empty() && spec.ramp && met {
            let last = match phase_spec {
                PhaseSpec::Students(n) => n,
                PhaseSpec::Rate { students, .. } => students,
            };
            let next = next_step(last);
            if next <= spec.max_students {
                queue.push_back(PhaseSpec::Students(next));
            } else {
                eprintln!("stopping: the next step ({next} students) is past --max-students");
            }
        }
    }

    // Cell runs still on their way to the socket (a persister catching up)
    // get a while longer to arrive, so late ones count as late, not unseen.
    if spec.gateway.is_some() {
        let deadline = Instant::now() + spec.socket_wait;
        let mut said = false;
        while !lock(&pending).is_empty() && Instant::now() < deadline {
            if !said {
                eprintln!(
                    "waiting up to {} s for {} cell runs to show on the instructor socket ...",
                    spec.socket_wait.as_secs(),
                    lock(&pending).len()
                );
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let _ = stop.send(true);
    let _ = sampling.await;
    let socket = match following {
        Some(following) => following.await.unwrap_or_default(),
        None => subscriber::Followed::default(),
    };
    // End-to-end figures, now that the socket is done.
    let pending = std::mem::take(&mut *lock(&pending));
    for phase in &mut phases {
        if let Some(latencies) = pending.latencies(phase.index) {
            phase.end_to_end_seen = latencies.len();
            phase.end_to_end_ms = Some(Percentiles::from_micros(latencies));
        }
    }
    let mut records = std::mem::take(&mut *lock(&records));
    let result = RunResult {
        student_marker: student_marker(&run_id),
        phases,
        timeline: records.timeline.seconds().to_vec(),
        samples: lock(&samples).clone(),
        end_to_end_unseen: pending.len() as u64,
        socket,
        wall_s: started.elapsed().as_secs_f64(),
    };
    Ok((result, std::mem::take(&mut records.ledger)))
}

#[allow(clippy::too_many_arguments)]
fn phase_result(
    index: usize,
    spec: PhaseSpec,
    tally: &PhaseTally,
    late: u64,
    start_s: f64,
    duration: Duration,
    samples: &[Sample],
    targets: &Targets,
) -> PhaseResult {
    let seconds = duration.as_secs_f64();
    let answered_over = tally.last_answer.as_secs_f64().max(seconds);
    let accept = Percentiles::from_micros(&tally.accept);
    let end = start_s + seconds;
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t >= start_s && s.t <= end + 1.0)
        .collect();
    let mut cpu: BTreeMap<String, f64> = BTreeMap::new();
    let mut rss: BTreeMap<String, f64> = BTreeMap::new();
    let mut connections: BTreeMap<String, u64> = BTreeMap::new();
    for sample in &during {
        for (group, value) in &sample.cpu_percent {
            *cpu.entry(group.clone()).or_default() += value / during.len() as f64;
        }
        for (group, value) in &sample.rss_mib {
            let top = rss.entry(group.clone()).or_default();
            *top = top.max(*value);
        }
        for (backend, n) in &sample.connections {
            let top = connections.entry(backend.clone()).or_default();
            *top = (*top).max(*n);
        }
    }
    let error_rate = tally.error_rate();
    PhaseResult {
        index,
        label: spec.label(),
        spec,
        start_s,
        duration_s: seconds,
        offered_events_per_s: tally.sent as f64 / seconds,
        achieved_events_per_s: tally.accepted as f64 / answered_over,
        events: tally.sent,
        accepted: tally.accepted,
        failed: tally.failed,
        error_rate,
        late_starts: late,
        statuses: tally.statuses.clone(),
        accept_latency_ms: accept,
        end_to_end_ms: None,
        end_to_end_seen: 0,
        cpu_percent: cpu,
        rss_mib: rss,
        connections,
        met_targets: tally.sent > 0
            && accept.p95 <= targets.p95_ms
            && error_rate <= targets.max_error_rate,
    }
}

/// One line per finished phase.
fn phase_line(p: &PhaseResult) -> String {
    format!(
        "phase {} ({}): offered {:.1} ev/s, achieved {:.1} ev/s, p95 {:.1} ms, p99 {:.1} ms, errors {:.3} %, {}",
        p.index + 1,
        p.label,
        p.offered_events_per_s,
        p.achieved_events_per_s,
        p.accept_latency_ms.p95,
        p.accept_latency_ms.p99,
        100.0 * p.error_rate,
        if p.met_targets {
            "met the targets"
        } else {
            "MISSED the targets"
        }
    )
}

/// The progress display of one phase.
struct Progress {
    ticker: tokio::task::JoinHandle<()>,
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn start(
        spec: &LoadSpec,
        index: usize,
        phase: &PhaseSpec,
        records: Arc<Mutex<Records>>,
        phase_start: Instant,
    ) -> Self {
        use std::io::IsTerminal as _;
        // The bar counts whole seconds: a phase shorter than one still
        // gets a bar of one.
        let total = spec.phase_duration.as_secs().max(1);
        let terminal = spec.progress && std::io::stderr().is_terminal();
        let bar = if terminal {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>22} [{bar:30}] {pos:>3}/{len} s  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_prefix(format!("phase {} {}", index + 1, phase.label()));
        let plain = spec.progress && !terminal;
        let ticker_bar = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut last_line = Instant::now();
            loop {
                tick.tick().await;
                let elapsed = phase_start.elapsed();
                let (sent, accepted, failed, p95) = {
                    let records = lock(&records);
                    let Some(t) = records.tallies.get(index) else {
                        continue;
                    };
                    (
                        t.sent,
                        t.accepted,
                        t.failed,
                        t.accept.value_at_quantile(0.95) as f64 / 1000.0,
                    )
                };
                let rate = accepted as f64 / elapsed.as_secs_f64().max(0.001);
                let message = format!(
                    "{sent} events, {rate:.0} ev/s accepted, p95 {p95:.1} ms, {failed} errors"
                );
                ticker_bar.set_position(elapsed.as_secs().min(total));
                ticker_bar.set_message(message.clone());
                if plain && last_line.elapsed() >= Duration::from_secs(5) {
                    last_line = Instant::now();
                    eprintln!(
                        "  phase {} {:>4.0} s  {message}",
                        index + 1,
                        elapsed.as_secs_f64()
                    );
                }
            }
        });
        Self { ticker, bar }
    }

    fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_of_0_is_refused_before_anything_runs() {
        let good = LoadSpec::default();
        good.check().expect("the defaults are runnable");
        let refused = |spec: LoadSpec| spec.check().expect_err("refused").to_string();
        let no_clients = refused(LoadSpec {
            clients: 0,
            ..LoadSpec::default()
        });
        assert!(
            no_clients.starts_with("clients (--clients)"),
            "{no_clients}"
        );
        let nothing_in_flight = refused(LoadSpec {
            max_in_flight: 0,
            ..LoadSpec::default()
        });
        assert!(
            nothing_in_flight.starts_with("max_in_flight (--max-in-flight)"),
            "{nothing_in_flight}"
        );
        let nobody = refused(LoadSpec {
            phases: vec![PhaseSpec::Rate {
                events_per_s: 10.0,
                students: 0,
            }],
            ..LoadSpec::default()
        });
        assert!(nobody.contains("at least 1 student"), "{nobody}");
        let no_phases = refused(LoadSpec {
            phases: Vec::new(),
            ..LoadSpec::default()
        });
        assert_eq!(no_phases, "no phases to run");
    }

    #[test]
    fn only_this_machine_is_loaded() {
        for url in [
            "http://127.0.0.1:8080/api/v1/events?token=x",
            "http://localhost:8080/api/v1/events",
            "http://[::1]:8080/api/v1/events",
            "http://127.3.2.1/api/v1/events",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://10.0.0.5:8080/api/v1/events",
            "https://example.ac.jp/api/v1/events",
            "http://127.0.0.1.example.ac.jp/x",
            "127.0.0.1:8080",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn the_ramp_goes_1_2_5_per_decade() {
        let mut steps = vec![100];
        while steps.len() < 8 {
            steps.push(next_step(*steps.last().unwrap()));
        }
        assert_eq!(steps, [100, 250, 500, 1000, 2500, 5000, 10000, 25000]);
        assert_eq!(next_step(75), 100);
        assert_eq!(next_step(0), 1);
    }

    #[test]
    fn events_are_in_the_wire_format() {
        let arrival = Arrival {
            at: Duration::ZERO,
            student: 7,
            action: Action::RunCell {
                notebook: 2,
                cell: 3,
                fails: true,
                execution: 5,
            },
        };
        let id = uuid::Uuid::new_v4();
        let text = event_json("abc123", 4, &arrival, id, "2026-11-30T10:00:00Z");
        let items: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(items.len(), 1);
        let event = &items[0];
        assert_eq!(event["eventId"], id.to_string());
        assert_eq!(event["eventType"], "cell_executed");
        assert_eq!(event["emailAddress"], "rabc123p4s7@example.ac.jp");
        assert_eq!(event["notebookPath"], "lesson2/exercise.ipynb");
        assert_eq!(event["hasError"], true);
        assert_eq!(event["executionCount"], 5);
        assert!(
            event["errorMessage"]
                .as_str()
                .unwrap()
                .starts_with("NameError")
        );
        // The server's own decoder and validation take it.
        let items = cellmon_domain::wire::decode_batch(text.as_bytes()).unwrap();
        let wire = cellmon_domain::wire::WireEvent::from_item(items[0]).unwrap();
        let valid = cellmon_domain::event::validate(wire, time::OffsetDateTime::now_utc());
        assert!(valid.is_ok(), "{valid:?}");

        let help = Arrival {
            action: Action::Help { notebook: 1 },
            ..arrival
        };
        let text = event_json("abc123", 4, &help, id, "2026-11-30T10:00:00Z");
        assert!(text.contains(r#""eventType":"help""#));
    }
}
