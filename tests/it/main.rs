//! Integration suites: the real receiver and processor against the real Kafka broker and CQL store.

mod bad_input;
mod changelog;
mod config;
mod crash;
mod history;
mod poll;
mod processor;
mod promise;
mod receiver;
mod secured;
mod sim;
mod stack;
mod trace;
