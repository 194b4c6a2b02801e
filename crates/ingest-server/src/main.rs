//! `ingest-server`: loads the configuration and serves.
//!
//! Configuration: defaults, then the TOML file named by `--config FILE` or
//! `CELLMON_INGEST_CONFIG`, then `CELLMON_INGEST_*` variables. A bad
//! configuration exits with status 64 and says what is wrong.

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
        |config| config.listen,
        serve,
    )
}
