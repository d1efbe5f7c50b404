//! Integration suites: the real receiver and processor against the real Kafka broker and CQL store.

mod config;
mod crash;
mod history;
mod processor;
mod receiver;
mod stack;
mod trace;
