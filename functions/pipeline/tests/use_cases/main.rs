//! The use-cases over the local adapters, in one test binary: analyze (with a scripted
//! provider) and the reconciler (with the states a crash leaves behind).

mod analyze;
mod batch;
mod budget;
mod generation;
mod ingest;
mod reconcile;
mod search;
