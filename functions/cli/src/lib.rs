//! The local runtime behind the `sightline` CLI: configuration, wiring on SQLite + files,
//! `run`, `serve` and the reporting commands.

pub mod app;
pub mod cli;
pub mod config;
pub mod generate;
pub mod run;
pub mod serve;
