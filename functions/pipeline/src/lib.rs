//! Use-cases over ports.
