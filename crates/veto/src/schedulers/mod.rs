//! Noise schedulers, each read from `scheduler_config.json`.

pub mod ddim;
pub mod discrete;
pub mod dpm_solver_multistep;
pub mod edm;
pub mod euler_discrete;
pub mod flow_match_euler;
pub mod lcm;
pub mod scheduler;
pub mod tcd;
