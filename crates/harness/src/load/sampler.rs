//! The server side of a load run, read from `/proc` once a second: CPU and
//! resident memory of the server processes and of each backend, and the
//! connections open to each backend.
//!
//! Processes are found by pid (the server, e.g. `harness up`'s own) and by
//! name (`ingest-server`, `persister`, `ws-gateway`, `postgres`, `redis-server`,
//! `influxd`; the backends' containers run on this machine's kernel, so
//! their processes are visible here). Connections are the established TCP
//! connections whose remote port is a backend's port, from
//! `/proc/net/tcp` and `/proc/net/tcp6`.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::Serialize;

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux this runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// What to watch.
#[derive(Debug, Clone, Default)]
pub struct SamplerSpec {
    /// Processes that make up the server (ingest, persister, gateway).
    pub server_pids: Vec<u32>,
    /// Backend name and the port its clients connect to.
    pub backend_ports: Vec<(String, u16)>,
}

/// One reading.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    /// CPU use per group over the last interval, in percent of one core.
    pub cpu_percent: BTreeMap<String, f64>,
    /// Resident memory per group, MiB.
    pub rss_mib: BTreeMap<String, f64>,
    /// Established connections per backend.
    pub connections: BTreeMap<String, u64>,
}

/// The group a process belongs to, by its name.
fn group_of(comm: &str) -> Option<&'static str> {
    match comm {
        "ingest-server" | "persister" | "ws-gateway" => Some("server"),
        "postgres" => Some("postgres"),
        "redis-server" => Some("redis"),
        "influxd" => Some("influxdb"),
        _ => None,
    }
}

/// Reads samples; keeps the CPU counters of the previous one.
#[derive(Debug)]
pub struct Sampler {
    spec: SamplerSpec,
    started: Instant,
    last: Option<(Instant, HashMap<u32, u64>)>,
}

impl Sampler {
    pub fn new(spec: SamplerSpec, started: Instant) -> Self {
        Self {
            spec,
            started,
            last: None,
        }
    }

    pub fn sample(&mut self) -> Sample {
        let now = Instant::now();
        let mut ticks: HashMap<u32, u64> = HashMap::new();
        let mut sample = Sample {
            t: now.duration_since(self.started).as_secs_f64(),
            ..Sample::default()
        };
        let mut groups: Vec<(u32, &'static str)> = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let group = if self.spec.server_pids.contains(&pid) {
                    Some("server")
                } else {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .ok()
                        .and_then(|comm| group_of(comm.trim()))
                };
                if let Some(group) = group {
                    groups.push((pid, group));
                }
            }
        }
        for (pid, group) in groups {
            let Some((cpu, rss_kib)) = read_process(pid) else {
                continue;
            };
            ticks.insert(pid, cpu);
            *sample.rss_mib.entry(group.to_owned()).or_default() += rss_kib as f64 / 1024.0;
            let used = self.last.as_ref().map_or(0.0, |(at, before)| {
                let seconds = now.duration_since(*at).as_secs_f64().max(0.001);
                let delta = cpu.saturating_sub(before.get(&pid).copied().unwrap_or(cpu));
                100.0 * delta as f64 / TICKS_PER_SECOND / seconds
            });
            *sample.cpu_percent.entry(group.to_owned()).or_default() += used;
        }
        let sockets = established_remote_ports();
        for (name, port) in &self.spec.backend_ports {
            let n = sockets.iter().filter(|p| *p == port).count() as u64;
            sample.connections.insert(name.clone(), n);
        }
        self.last = Some((now, ticks));
        sample
    }
}

/// (utime + stime in ticks, VmRSS in KiB) of a process.
fn read_process(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let cpu = cpu_ticks(&stat)?;
    let rss = crate::procfs::rss_kib(pid).unwrap_or(0);
    Some((cpu, rss))
}

/// utime + stime from a `/proc/PID/stat` line. The name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The remote ports of established TCP connections (IPv4 and IPv6).
fn established_remote_ports() -> Vec<u16> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| parse_tcp_table(&table))
        .collect()
}

/// Remote ports of the `ESTABLISHED` (state 01) rows of a `/proc/net/tcp`
/// table.
fn parse_tcp_table(table: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _slot = fields.next()?;
            let _local = fields.next()?;
            let remote = fields.next()?;
            let state = fields.next()?;
            if state != "01" {
                return None;
            }
            u16::from_str_radix(remote.rsplit(':').next()?, 16).ok()
        })
        .collect()
}

/// (name, port) of each backend, from (kind, URL): what
/// [`SamplerSpec::backend_ports`] holds.
pub fn backend_ports(
    urls: impl IntoIterator<Item = (cellmon_testkit::backend::BackendKind, String)>,
) -> Vec<(String, u16)> {
    urls.into_iter()
        .filter_map(|(kind, url)| Some((kind.name().to_owned(), port_of(&url)?)))
        .collect()
}

/// The port of a URL like `redis://127.0.0.1:6379/0` or
/// `postgres://user:pw@127.0.0.1:5432/db`.
pub fn port_of(url: &str) -> Option<u16> {
    let authority = url.split("://").nth(1)?.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    host_port.rsplit(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_names_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (worker) 1) S 1 4242 4242 0 -1 4194560 2511 0 0 0 \
                    150 37 0 0 20 0 9 0 12345 1000000 2500 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(187));
    }

    #[test]
    fn established_rows_give_their_remote_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:D2F0 0100007F:18EB 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n\
   2: 0100007F:D2F2 0100007F:18EB 06 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n";
        assert_eq!(parse_tcp_table(table), vec![0x18EB]);
    }

    #[test]
    fn ports_of_backend_urls() {
        assert_eq!(port_of("redis://127.0.0.1:6379/0"), Some(6379));
        assert_eq!(port_of("postgres://u:p@127.0.0.1:5432/cellmon"), Some(5432));
        assert_eq!(port_of("http://127.0.0.1:8086"), Some(8086));
        assert_eq!(port_of("not a url"), None);
    }

    #[test]
    fn this_process_is_found_and_measured() {
        let mut sampler = Sampler::new(
            SamplerSpec {
                server_pids: vec![std::process::id()],
                backend_ports: Vec::new(),
            },
            Instant::now(),
        );
        let _ = sampler.sample();
        // Burn some CPU, then the second reading shows it.
        let mut x = 0u64;
        let spin = Instant::now();
        while spin.elapsed().as_millis() < 300 {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert_ne!(x, 1);
        let sample = sampler.sample();
        assert!(sample.rss_mib["server"] > 1.0, "{sample:?}");
        assert!(sample.cpu_percent["server"] > 10.0, "{sample:?}");
    }
}
