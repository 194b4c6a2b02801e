//! `ingest-server`: loads the configuration and serves.
//!
//! Configuration: defaults, then the TOML file named by `--config FILE` or
//! `CELLMON_INGEST_CONFIG`, then `CELLMON_INGEST_*` variables, checked
//! once. A bad configuration exits with status 64 and prints
//! `ingest-server: bad configuration: <key>: <reason>`.

use std::process::ExitCode;

use cellmon_ingest::{Config, serve};
use cellmon_service::Binary;

fn main() -> ExitCode {
    cellmon_service::run(
        Binary {
            name: "ingest-server",
            config_var: "CELLMON_INGEST_CONFIG",
            docs: "CELLMON_INGEST_* in docs/ingest.md",
        },
        Config::load,
        |config| config.listen.addr,
        serve,
    )
}
