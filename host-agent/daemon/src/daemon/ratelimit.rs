//! The per-VM budget for log lines that guest behaviour can trigger; it lives in `shared-proto`
//! so that the device uses the same one.

pub use shared_proto::ratelimit::LogBudget;
