//! Cell Monitor's harness: the commands that run the whole system on one
//! machine and measure it. Its binary is `harness` (see `harness --help`);
//! the backends, the fault proxy and the ledger check come from
//! `cellmon-testkit`.
//!
//! * [`system`]: [`system::LocalSystem`], the three backends with the
//!   ingest server, the persister and the gateway in this process
//!   (`harness up`, `harness chaos`).
//! * [`load`]: the classroom load generator (`harness load`).
//! * [`chaos`]: a RELIABILITY.md fault under load (`harness chaos`).
//! * [`fanout`]: the gateway's fan-out benchmark (`harness fanout`).
//! * [`report`]: the load report as JSON, HTML and Markdown.
//! * [`procfs`]: what `/proc` says about a process (CPU, memory).

pub mod chaos;
pub mod fanout;
pub mod load;
pub mod procfs;
pub mod report;
pub mod system;

/// The current time, RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
