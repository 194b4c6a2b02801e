//! The report of a load or chaos run: JSON (a stable schema, for
//! machines), a self-contained HTML page with charts (for people), and a
//! Markdown summary (for the terminal).
//!
//! The charts are SVG drawn by `plotters` and inlined in the page, so it
//! needs no network and no script to show them. A small inline script only
//! marks the page once the browser has laid the charts out
//! (`data-charts-rendered` on `<body>`), which the browser test reads.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::Serialize;

use crate::load::behaviour::Behaviour;
use crate::load::sampler::Sample;
use crate::load::stats::Second;
use crate::load::{LoadSpec, PhaseResult, RunResult, Targets};
use cellmon_testkit::verify::Verdict;

/// The JSON schema's name and version; bumped on any incompatible change.
pub const SCHEMA: &str = "cellmon.load-report.v1";

/// A window in which a fault was applied, shaded on the charts.
#[derive(Debug, Clone, Serialize)]
pub struct FaultWindow {
    pub name: String,
    pub start_s: f64,
    pub end_s: f64,
}

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory_gib: f64,
    pub cpu_model: String,
}

impl Machine {
    pub fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map_or_else(|| "unknown".to_owned(), |m| m.trim().to_owned()),
        }
    }
}

/// The highest load that met the targets.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub phase: usize,
    pub label: String,
    pub students: Option<u32>,
    pub events_per_s: f64,
    pub accept_p95_ms: f64,
    pub end_to_end_p99_ms: Option<f64>,
}

/// The ledger check's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerFigures {
    pub acknowledged: usize,
    pub refused: usize,
    pub unknown: usize,
    pub postgres_stored: usize,
    pub postgres_lost: usize,
    pub postgres_duplicates: usize,
    pub postgres_unexpected: usize,
    pub influx_stored: usize,
    pub influx_lost: usize,
    pub influx_duplicates: usize,
    pub influx_unexpected: usize,
    pub agreement_percent: f64,
    pub passed: bool,
}

impl LedgerFigures {
    /// The figures in one sentence (no markup).
    pub fn sentence(&self) -> String {
        format!(
            "Ledger check: {} acknowledged, {} refused, {} unknown; Postgres {} stored, {} lost, {} duplicates, {} unexpected; InfluxDB {} stored, {} lost, {} duplicates, {} unexpected; agreement {:.2} %",
            self.acknowledged,
            self.refused,
            self.unknown,
            self.postgres_stored,
            self.postgres_lost,
            self.postgres_duplicates,
            self.postgres_unexpected,
            self.influx_stored,
            self.influx_lost,
            self.influx_duplicates,
            self.influx_unexpected,
            self.agreement_percent
        )
    }
}

impl From<&Verdict> for LedgerFigures {
    fn from(v: &Verdict) -> Self {
        Self {
            acknowledged: v.acknowledged,
            refused: v.refused,
            unknown: v.unknown,
            postgres_stored: v.postgres.stored,
            postgres_lost: v.postgres.lost.len(),
            postgres_duplicates: v.postgres.duplicates.len(),
            postgres_unexpected: v.postgres.unexpected.len(),
            influx_stored: v.influx.stored,
            influx_lost: v.influx.lost.len(),
            influx_duplicates: v.influx.duplicates.len(),
            influx_unexpected: v.influx.unexpected.len(),
            agreement_percent: v.agreement_percent(),
            passed: v.passes(),
        }
    }
}

/// Pass or fail, with the reasons.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub passed: bool,
    pub reasons: Vec<String>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// `load` or `chaos SCENARIO`.
    pub kind: String,
    pub started_at: String,
    /// The command line that produced it.
    pub command: String,
    pub machine: Machine,
    pub targets: Targets,
    pub behaviour: Behaviour,
    pub phase_duration_s: f64,
    pub phases: Vec<PhaseResult>,
    pub capacity: Option<Capacity>,
    /// Per second of the run: events offered, accepted, failed.
    pub timeline: Vec<Second>,
    /// Once a second: CPU, memory, backend connections.
    pub resources: Vec<Sample>,
    pub faults: Vec<FaultWindow>,
    pub end_to_end_unseen: u64,
    /// Times the instructor's socket was told to resync (too far behind).
    pub socket_resyncs: u64,
    pub socket_reconnections: u64,
    pub ledger: Option<LedgerFigures>,
    pub wall_s: f64,
    pub outcome: Outcome,
}

impl Report {
    /// Judges a run against the targets: every listed phase met them, the
    /// best phase reached the rate asked for, and the ledger check passed
    /// (when it ran).
    pub fn new(
        kind: String,
        command: String,
        started_at: String,
        spec: &LoadSpec,
        run: RunResult,
        faults: Vec<FaultWindow>,
        verdict: Option<&Verdict>,
    ) -> Self {
        let targets = spec.targets;
        let capacity = run
            .phases
            .iter()
            .filter(|p| p.met_targets)
            .max_by(|a, b| a.offered_events_per_s.total_cmp(&b.offered_events_per_s))
            .map(|p| Capacity {
                phase: p.index,
                label: p.label.clone(),
                students: match p.spec {
                    crate::load::PhaseSpec::Students(n) => Some(n),
                    crate::load::PhaseSpec::Rate { .. } => None,
                },
                events_per_s: p.achieved_events_per_s,
                accept_p95_ms: p.accept_latency_ms.p95,
                end_to_end_p99_ms: p.end_to_end_ms.map(|e| e.p99),
            });
        let mut reasons = Vec::new();
        for phase in run.phases.iter().take(spec.phases.len()) {
            if !phase.met_targets {
                reasons.push(format!(
                    "phase {} ({}) missed the targets: p95 {:.1} ms (target {} ms), error rate {:.4} (target {})",
                    phase.index + 1,
                    phase.label,
                    phase.accept_latency_ms.p95,
                    targets.p95_ms,
                    phase.error_rate,
                    targets.max_error_rate
                ));
            }
        }
        if let Some(min) = targets.min_events_per_s {
            let best = capacity.as_ref().map_or(0.0, |c| c.events_per_s);
            if best < min {
                reasons.push(format!(
                    "the best phase that met the targets accepted {best:.1} events/s (target {min})"
                ));
            }
        }
        if let Some(verdict) = verdict
            && !verdict.passes()
        {
            reasons.push("the ledger check failed (lost, duplicate or unexpected events)".into());
        }
        Self {
            schema: SCHEMA,
            kind,
            started_at,
            command,
            machine: Machine::this(),
            targets,
            behaviour: spec.behaviour.clone(),
            phase_duration_s: spec.phase_duration.as_secs_f64(),
            phases: run.phases,
            capacity,
            timeline: run.timeline,
            resources: run.samples,
            faults,
            end_to_end_unseen: run.end_to_end_unseen,
            socket_resyncs: run.socket.resyncs,
            socket_reconnections: run.socket.reconnections,
            ledger: verdict.map(LedgerFigures::from),
            wall_s: run.wall_s,
            outcome: Outcome {
                passed: reasons.is_empty(),
                reasons,
            },
        }
    }

    /// "Highest load that met ...", with the load's label as given.
    fn capacity_sentence(&self, c: &Capacity, label: &str) -> String {
        format!(
            "Highest load that met p95 ≤ {} ms and error rate ≤ {}: {label}, {:.1} events/s accepted, p95 {:.1} ms, end-to-end p99 {}.",
            self.targets.p95_ms,
            self.targets.max_error_rate,
            c.events_per_s,
            c.accept_p95_ms,
            c.end_to_end_p99_ms
                .map_or_else(|| "not measured".to_owned(), |v| format!("{v:.1} ms"))
        )
    }

    /// The terminal summary.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Cell Monitor {} report\n", self.kind);
        let _ = writeln!(
            md,
            "{} · {} CPUs ({}) · {} GiB · {:.0} s\n",
            self.started_at,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_gib,
            self.wall_s
        );
        let _ = writeln!(
            md,
            "| phase | load | offered ev/s | achieved ev/s | p50 ms | p95 ms | p99 ms | max ms | e2e p50 ms | e2e p99 ms | errors | server CPU % | server RSS MiB | conns pg/redis/influx | targets |"
        );
        let _ = writeln!(
            md,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for p in &self.phases {
            let e2e = |f: fn(&crate::load::Percentiles) -> f64| {
                p.end_to_end_ms
                    .as_ref()
                    .map_or_else(|| "–".to_owned(), |e| format!("{:.1}", f(e)))
            };
            let conn = |name: &str| {
                p.connections
                    .get(name)
                    .map_or_else(|| "–".to_owned(), u64::to_string)
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.3} % | {} | {} | {}/{}/{} | {} |",
                p.index + 1,
                p.label,
                p.offered_events_per_s,
                p.achieved_events_per_s,
                p.accept_latency_ms.p50,
                p.accept_latency_ms.p95,
                p.accept_latency_ms.p99,
                p.accept_latency_ms.max,
                e2e(|e| e.p50),
                e2e(|e| e.p99),
                100.0 * p.error_rate,
                p.cpu_percent
                    .get("server")
                    .map_or_else(|| "–".to_owned(), |c| format!("{c:.0}")),
                p.rss_mib
                    .get("server")
                    .map_or_else(|| "–".to_owned(), |r| format!("{r:.0}")),
                conn("postgres"),
                conn("redis"),
                conn("influxdb"),
                if p.met_targets { "met" } else { "**missed**" }
            );
        }
        md.push('\n');
        match &self.capacity {
            Some(c) => {
                let _ = writeln!(md, "{}", self.capacity_sentence(c, &c.label));
            }
            None => {
                let _ = writeln!(md, "No phase met the targets.");
            }
        }
        for fault in &self.faults {
            let _ = writeln!(
                md,
                "Fault `{}` from {:.1} s to {:.1} s.",
                fault.name, fault.start_s, fault.end_s
            );
        }
        if let Some(l) = &self.ledger {
            let verdict = if l.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(md, "\n{}: **{verdict}**", l.sentence());
        }
        if self.end_to_end_unseen > 0 || self.socket_resyncs > 0 || self.socket_reconnections > 0 {
            let _ = writeln!(
                md,
                "\nInstructor socket: {} cell runs never showed on it; told to resync {} times; reconnected {} times.",
                self.end_to_end_unseen, self.socket_resyncs, self.socket_reconnections
            );
        }
        let _ = writeln!(
            md,
            "\nResult: **{}**",
            if self.outcome.passed { "PASS" } else { "FAIL" }
        );
        for reason in &self.outcome.reasons {
            let _ = writeln!(md, "- {reason}");
        }
        md
    }

    /// The page, with its charts inline.
    pub fn html(&self) -> anyhow::Result<String> {
        let charts = [
            (
                "throughput",
                "Throughput over time (events/s)",
                throughput_chart(self)?,
            ),
            (
                "latency",
                "Accept and end-to-end latency per phase (ms, log scale)",
                latency_chart(self)?,
            ),
            (
                "cpu",
                "CPU over time (% of one core)",
                resource_chart(self, Resource::Cpu)?,
            ),
            (
                "rss",
                "Resident memory over time (MiB)",
                resource_chart(self, Resource::Rss)?,
            ),
        ];
        let mut html = String::new();
        let _ = write!(
            html,
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Cell Monitor {kind} report</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ background: #f3f3f3; }}
td:nth-child(2), th:nth-child(2) {{ text-align: left; }}
.pass {{ color: #176b2c; font-weight: bold; }} .fail {{ color: #b00020; font-weight: bold; }}
figure.chart {{ margin: 1.5em 0; }} figure.chart svg {{ width: 100%; height: auto; }}
figcaption {{ font-weight: 600; margin-bottom: .3em; }}
</style></head>
<body data-charts="{n}">
<h1>Cell Monitor {kind} report</h1>
<p>{started} · {cpus} CPUs ({model}) · {mem} GiB · {wall:.0} s · <code>{command}</code></p>
<p>Result: <span class="{class}">{result}</span></p>
"#,
            kind = escape(&self.kind),
            n = charts.len(),
            started = escape(&self.started_at),
            cpus = self.machine.cpus,
            model = escape(&self.machine.cpu_model),
            mem = self.machine.memory_gib,
            wall = self.wall_s,
            command = escape(&self.command),
            class = if self.outcome.passed { "pass" } else { "fail" },
            result = if self.outcome.passed { "PASS" } else { "FAIL" },
        );
        if !self.outcome.reasons.is_empty() {
            html.push_str("<ul>");
            for reason in &self.outcome.reasons {
                let _ = write!(html, "<li>{}</li>", escape(reason));
            }
            html.push_str("</ul>\n");
        }
        if let Some(c) = &self.capacity {
            let label = format!("<b>{}</b>", escape(&c.label));
            let _ = writeln!(html, "<p>{}</p>", self.capacity_sentence(c, &label));
        }
        html.push_str("<table><tr><th>phase</th><th>load</th><th>offered ev/s</th><th>achieved ev/s</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>max ms</th><th>e2e p99 ms</th><th>errors</th><th>statuses</th><th>targets</th></tr>\n");
        for p in &self.phases {
            let statuses: Vec<String> = p
                .statuses
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect();
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td><td>{:.3} %</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                p.index + 1,
                escape(&p.label),
                p.offered_events_per_s,
                p.achieved_events_per_s,
                p.accept_latency_ms.p50,
                p.accept_latency_ms.p95,
                p.accept_latency_ms.p99,
                p.accept_latency_ms.max,
                p.end_to_end_ms
                    .map_or_else(|| "–".to_owned(), |e| format!("{:.1}", e.p99)),
                100.0 * p.error_rate,
                escape(&statuses.join(", ")),
                if p.met_targets { "pass" } else { "fail" },
                if p.met_targets { "met" } else { "missed" },
            );
        }
        html.push_str("</table>\n");
        if let Some(l) = &self.ledger {
            let (class, verdict) = if l.passed {
                ("pass", "PASS")
            } else {
                ("fail", "FAIL")
            };
            let _ = writeln!(
                html,
                "<p>{}: <span class=\"{class}\">{verdict}</span></p>",
                l.sentence()
            );
        }
        for (id, caption, svg) in &charts {
            let _ = writeln!(
                html,
                "<figure class=\"chart\" id=\"chart-{id}\"><figcaption>{caption}</figcaption>\n{svg}\n</figure>"
            );
        }
        html.push_str(
            r#"<script>
addEventListener("load", () => {
  const drawn = [...document.querySelectorAll("figure.chart svg")].filter((svg) => {
    const box = svg.getBoundingClientRect();
    return box.width > 100 && box.height > 50 && svg.querySelectorAll("polyline, path, rect").length > 0;
  });
  document.body.setAttribute("data-charts-rendered", String(drawn.length));
});
</script>
</body></html>
"#,
        );
        Ok(html)
    }

    /// Writes `report.json`, `report.html` and `report.md` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<[PathBuf; 3]> {
        std::fs::create_dir_all(dir)?;
        let paths = [
            dir.join("report.json"),
            dir.join("report.html"),
            dir.join("report.md"),
        ];
        std::fs::write(&paths[0], serde_json::to_string_pretty(self)?)?;
        std::fs::write(&paths[1], self.html()?)?;
        std::fs::write(&paths[2], self.markdown())?;
        Ok(paths)
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const SIZE: (u32, u32) = (960, 360);

/// A line over time: name, value per second, color, width.
type TimeSeries = (&'static str, fn(&Second) -> u64, RGBAColor, u32);
/// A line over phases: name and value per phase.
type PhaseSeries = (&'static str, fn(&PhaseResult) -> Option<f64>);
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

fn plot_error<E: std::error::Error + Send + Sync + 'static>(
    error: plotters::drawing::DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {error}")
}

/// A chart of this module: SVG, f64 on both axes (linear or log).
type Chart<'a, 'b, X, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>;

/// A named line, in the legend too.
fn line<X, Y>(
    chart: &mut Chart<'_, '_, X, Y>,
    points: impl IntoIterator<Item = (f64, f64)>,
    style: ShapeStyle,
    name: &str,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(points, style))
        .map_err(plot_error)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], style));
    Ok(())
}

/// The legend, top left.
fn legend<'a, 'b: 'a, X, Y>(chart: &mut Chart<'a, 'b, X, Y>) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)
}

/// A chart over the run's seconds, with its axes, fault windows and phase
/// starts drawn.
fn time_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    report: &Report,
    seconds: f64,
    y_max: f64,
    unit: &str,
) -> anyhow::Result<Chart<'a, 'b, RangedCoordf64, RangedCoordf64>> {
    let mut chart = ChartBuilder::on(root)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..seconds, 0f64..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start (numbers: phase starts)")
        .y_desc(unit)
        .draw()
        .map_err(plot_error)?;
    time_marks(&mut chart, report, y_max)?;
    Ok(chart)
}

/// Shades fault windows and marks phase starts on a time chart.
fn time_marks<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    report: &Report,
    y_max: f64,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let shade = RGBColor(214, 39, 40).mix(0.15);
    if !report.faults.is_empty() {
        chart
            .draw_series(
                report
                    .faults
                    .iter()
                    .map(|f| Rectangle::new([(f.start_s, 0.0), (f.end_s, y_max)], shade.filled())),
            )
            .map_err(|e| anyhow::anyhow!("drawing a chart: {e}"))?
            .label("fault")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], shade.filled()));
    }
    let grey = RGBColor(150, 150, 150);
    chart
        .draw_series(report.phases.iter().map(|p| {
            PathElement::new(
                vec![(p.start_s, 0.0), (p.start_s, y_max)],
                grey.stroke_width(1),
            )
        }))
        .map_err(|e| anyhow::anyhow!("drawing a chart: {e}"))?;
    chart
        .draw_series(report.phases.iter().map(|p| {
            Text::new(
                format!("{}", p.index + 1),
                (p.start_s, y_max * 0.97),
                ("sans-serif", 12).into_font().color(&grey),
            )
        }))
        .map_err(|e| anyhow::anyhow!("drawing a chart: {e}"))?;
    Ok(())
}

fn throughput_chart(report: &Report) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        // An empty timeline still spans a second of axis.
        let seconds = report.timeline.len().max(1) as f64;
        // A run that sent nothing still gets a y axis of 1 event/s.
        let y_max = report
            .timeline
            .iter()
            .map(|s| s.offered.max(s.accepted).max(s.failed))
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.1;
        let mut chart = time_chart(&root, report, seconds, y_max, "events/s")?;
        // Offered is wide and pale underneath: where the server keeps up,
        // accepted runs along its middle.
        let series: [TimeSeries; 3] = [
            ("offered", |s| s.offered, PALETTE[0].mix(0.35), 6),
            ("accepted", |s| s.accepted, PALETTE[0].to_rgba(), 2),
            (
                "refused or unanswered",
                |s| s.failed,
                PALETTE[1].to_rgba(),
                2,
            ),
        ];
        for (name, value, color, width) in series {
            let points = report
                .timeline
                .iter()
                .enumerate()
                .map(|(t, s)| (t as f64 + 0.5, value(s) as f64));
            line(&mut chart, points, color.stroke_width(width), name)?;
        }
        legend(&mut chart)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

fn latency_chart(report: &Report) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        // A report without phases still has one slot of axis.
        let phases = report.phases.len().max(1);
        let highest = report
            .phases
            .iter()
            .flat_map(|p| {
                [
                    p.accept_latency_ms.p99,
                    p.end_to_end_ms.map_or(0.0, |e| e.p99),
                ]
            })
            .fold(report.targets.p95_ms, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(
                -0.5f64..phases as f64 - 0.5,
                (0.1f64..highest * 2.0).log_scale(),
            )
            .map_err(plot_error)?;
        let labels: Vec<String> = report.phases.iter().map(|p| p.label.clone()).collect();
        chart
            .configure_mesh()
            .x_labels(phases)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("ms")
            .draw()
            .map_err(plot_error)?;
        let target = report.targets.p95_ms;
        line(
            &mut chart,
            [(-0.5, target), (phases as f64 - 0.5, target)],
            PALETTE[1].mix(0.5).stroke_width(1),
            &format!("target p95 {target} ms"),
        )?;
        let series: [PhaseSeries; 4] = [
            ("accept p50", |p| Some(p.accept_latency_ms.p50)),
            ("accept p95", |p| Some(p.accept_latency_ms.p95)),
            ("accept p99", |p| Some(p.accept_latency_ms.p99)),
            ("end-to-end p99", |p| p.end_to_end_ms.map(|e| e.p99)),
        ];
        for (i, (name, value)) in series.iter().enumerate() {
            let color = PALETTE[(i + 2) % PALETTE.len()];
            let points: Vec<(f64, f64)> = report
                .phases
                .iter()
                .filter_map(|p| value(p).map(|v| (p.index as f64, v.max(0.1))))
                .collect();
            if points.is_empty() {
                continue;
            }
            line(&mut chart, points.clone(), color.stroke_width(2), name)?;
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(plot_error)?;
        }
        legend(&mut chart)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

#[derive(Clone, Copy)]
enum Resource {
    Cpu,
    Rss,
}

fn resource_chart(report: &Report, resource: Resource) -> anyhow::Result<String> {
    let value = |s: &Sample, group: &str| match resource {
        Resource::Cpu => s.cpu_percent.get(group).copied(),
        Resource::Rss => s.rss_mib.get(group).copied(),
    };
    let groups: BTreeSet<String> = report
        .resources
        .iter()
        .flat_map(|s| match resource {
            Resource::Cpu => s.cpu_percent.keys().cloned().collect::<Vec<_>>(),
            Resource::Rss => s.rss_mib.keys().cloned().collect(),
        })
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let seconds = report
            .resources
            .last()
            .map_or(1.0, |s| s.t)
            .max(report.timeline.len() as f64)
            .max(1.0);
        let y_max = report
            .resources
            .iter()
            .flat_map(|s| groups.iter().filter_map(move |g| value(s, g)))
            .fold(1.0, f64::max)
            * 1.1;
        let unit = match resource {
            Resource::Cpu => "% of one core",
            Resource::Rss => "MiB",
        };
        let mut chart = time_chart(&root, report, seconds, y_max, unit)?;
        for (i, group) in groups.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let points = report
                .resources
                .iter()
                .filter_map(|s| value(s, group).map(|v| (s.t, v)));
            line(&mut chart, points, color.stroke_width(2), group)?;
        }
        legend(&mut chart)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}
