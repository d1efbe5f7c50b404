//! Integration suites: the real receiver and processor against the real Kafka broker and CQL store.

mod bad_input;
mod changelog;
mod config;
mod crash;
mod history;
mod logs;
mod poll;
mod processor;
mod promise;
mod receiver;
mod secured;
mod sim;
mod stack;
mod tools;
mod trace;
