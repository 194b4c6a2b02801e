//! `ws-gateway`: loads the configuration and serves.
//!
//! Configuration: defaults, then the TOML file named by `--config FILE` or
//! `CELLMON_GATEWAY_CONFIG`, then `CELLMON_GATEWAY_*` variables, checked
//! once. A bad configuration exits with status 64 and prints
//! `ws-gateway: bad configuration: <key>: <reason>`.

use std::process::ExitCode;

use cellmon_gateway::{Config, serve};
use cellmon_service::Binary;

fn main() -> ExitCode {
    cellmon_service::run(
        Binary {
            name: "ws-gateway",
            config_var: "CELLMON_GATEWAY_CONFIG",
            docs: "CELLMON_GATEWAY_* in docs/gateway.md",
        },
        Config::load,
        |config| config.listen.addr,
        serve,
    )
}
