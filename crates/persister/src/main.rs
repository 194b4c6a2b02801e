//! `persister`: loads the configuration and serves.
//!
//! Configuration: defaults, then the TOML file named by `--config FILE` or
//! `CELLMON_PERSISTER_CONFIG`, then `CELLMON_PERSISTER_*` variables,
//! checked once. A bad configuration exits with status 64 and prints
//! `persister: bad configuration: <key>: <reason>`.

use std::process::ExitCode;

use cellmon_persister::{Config, serve};
use cellmon_service::Binary;

fn main() -> ExitCode {
    cellmon_service::run(
        Binary {
            name: "persister",
            config_var: "CELLMON_PERSISTER_CONFIG",
            docs: "CELLMON_PERSISTER_* in docs/persister.md",
        },
        Config::load,
        |config| config.listen.addr,
        serve,
    )
}
