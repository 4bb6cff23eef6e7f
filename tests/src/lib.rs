//! Test harness.

pub mod aws_setup;
pub mod contract;
pub mod emulator;
pub mod fault_run;
pub mod sim;
