//! Figures for `carhook-bench`, one module per service.

pub mod end_to_end;
pub mod processor;
