//! The step window of attention guidance (early stopping, NAG appendix G).
//!
//! The paper applies NAG to the first theta portion of the steps; the official code turns it
//! off for good once `t < (1 - nag_end) * 1000`, with `t` on the 0..1000 training scale. Since
//! timesteps only decrease, that is: guidance runs at a step while `t >= (1 - nag_end) * 1000`.
//! `nag_end = 1` runs it at every step, `nag_end = 0` only at `t = 1000`.

/// Whether attention guidance runs at timestep `t` (0..=`num_train_timesteps` scale).
pub fn is_active(t: f64, nag_end: f64, num_train_timesteps: f64) -> bool {
    t >= (1.0 - nag_end) * num_train_timesteps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_rule() {
        // schnell, 4 steps: t = 1000, 750, 500, 250
        let ts = [1000.0, 750.0, 500.0, 250.0];
        let on = |end: f64| ts.iter().filter(|&&t| is_active(t, end, 1000.0)).count();
        assert_eq!(on(1.0), 4);
        assert_eq!(on(0.5), 3); // 500 >= 500
        assert_eq!(on(0.25), 2); // 750 >= 750
        assert_eq!(on(0.0), 1); // only t = 1000
        assert!(!is_active(249.9, 0.75, 1000.0));
    }
}
