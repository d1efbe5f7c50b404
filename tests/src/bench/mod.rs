//! Figures for `carhook-bench`, one module per service.

pub mod processor;
