//! Test harness: the provider simulator, the emulator stack, the adapter contract suite,
//! fault runs and a webhook receiver.

pub mod aws_setup;
pub mod batch_run;
pub mod contract;
pub mod emulator;
pub mod fault_run;
pub mod fault_run_aws;
pub mod gen_fault_run;
pub mod sim;
pub mod webhook_receiver;
