//! The integration tests that share the local services of
//! `scripts/services.sh` (each test on its own database, topics and roles),
//! one module per area, in one binary: `cargo test --test it`, one area with
//! `cargo test --test it security::`.
//!
//! The tests that stop and start services of their own (`tests/faults.rs`),
//! run a three-broker cluster (`tests/cluster.rs`) or build the container
//! image (`tests/image.rs`) are binaries of their own on the same helpers.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod consumer;
mod dlq;
mod failures;
mod observability;
mod operations;
mod ownership;
mod relay_e2e;
mod scale;
mod schemas;
mod security;
mod tls;
mod upgrade;
