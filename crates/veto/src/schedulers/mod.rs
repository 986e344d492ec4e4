//! Noise schedulers, each read from `scheduler_config.json`.

pub mod flow_match_euler;
