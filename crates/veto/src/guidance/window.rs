//! The step window of attention guidance (early stopping, NAG appendix G).
//!
//! The paper applies NAG to the first theta portion of the steps; the official code turns it
//! off for good once the timestep falls below a threshold, with two rules:
//! - [`StepWindow::Threshold`] (official Flux / SD3 / Wan pipelines): guidance runs while
//!   `t >= (1 - nag_end) * N`, `N` = `num_train_timesteps` (1000);
//! - [`StepWindow::FlooredSticky`] (official SDXL pipeline): it stops once
//!   `t < floor((1 - nag_end) * (N - 1))`.
//!
//! Either way `nag_end = 1` runs it at every step. Timesteps decrease, so "off for good" only
//! matters for explicit, non-monotone timesteps; [`super::GuidancePlanner`] keeps it closed.

/// Which official rule decides whether attention guidance runs at a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepWindow {
    /// `t >= (1 - nag_end) * N` (Flux, SD3, Wan).
    Threshold,
    /// `!(t < floor((1 - nag_end) * (N - 1)))` (SDXL and the UNet family).
    FlooredSticky,
}

impl StepWindow {
    /// Whether attention guidance runs at timestep `t` (0..=`num_train_timesteps` scale).
    pub fn is_open(&self, t: f64, nag_end: f64, num_train_timesteps: f64) -> bool {
        match self {
            StepWindow::Threshold => t >= (1.0 - nag_end) * num_train_timesteps,
            StepWindow::FlooredSticky => t >= ((1.0 - nag_end) * (num_train_timesteps - 1.0)).floor(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_rule() {
        // schnell, 4 steps: t = 1000, 750, 500, 250
        let ts = [1000.0, 750.0, 500.0, 250.0];
        let on = |end: f64| ts.iter().filter(|&&t| StepWindow::Threshold.is_open(t, end, 1000.0)).count();
        assert_eq!(on(1.0), 4);
        assert_eq!(on(0.5), 3); // 500 >= 500
        assert_eq!(on(0.25), 2); // 750 >= 750
        assert_eq!(on(0.0), 1); // only t = 1000
        assert!(!StepWindow::Threshold.is_open(249.9, 0.75, 1000.0));
    }

    #[test]
    fn floored_rule() {
        // floor(0.5 * 999) = 499: 499 is inside, 498 outside.
        assert!(StepWindow::FlooredSticky.is_open(499.0, 0.5, 1000.0));
        assert!(!StepWindow::FlooredSticky.is_open(498.0, 0.5, 1000.0));
        // The Threshold rule would put 499 outside.
        assert!(!StepWindow::Threshold.is_open(499.0, 0.5, 1000.0));
        assert!(StepWindow::FlooredSticky.is_open(0.0, 1.0, 1000.0));
    }
}
