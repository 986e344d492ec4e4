//! A per-op-class profile of model forward passes: where a step's time goes (matrix products,
//! attention, softmax and log-sum-exp merges, copies, norms, guidance math) and how many bytes
//! copies move, so the extra cost of a guidance method can be attributed (`veto bench --profile`).
//!
//! Off by default and then free (one relaxed atomic load per scope). When on, each [`scope`]
//! measures wall time on the calling thread and charges its *self* time (minus nested scopes) to
//! its class; the rest of the step is "other" (elementwise work of the models). Timing is exact
//! on the CPU, where every op returns finished; on a GPU kernels run asynchronously, so the
//! classes are meaningful only with the device synchronised (the bench does not profile GPUs).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The classes time is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Linear layers and convolutions (weights × activations).
    Matmul,
    /// The two products of attention, `q kᵀ` and `p v` (on the CPU in f32 the fused kernel,
    /// softmax included).
    AttentionMatmul,
    /// Softmax, and the log-sum-exp of a key block kept for merging (where attention is not
    /// fused: the GPU, other dtypes).
    Softmax,
    /// Merging per-block attentions by their log-sum-exp weights.
    Merge,
    /// Concatenations, contiguous copies and dtype casts.
    Copy,
    /// Layer, RMS and group norms.
    Norm,
    /// The guidance combination (NAG, NASA, VSF's flip, CFG).
    Guidance,
}

impl Op {
    /// Every class, in report order.
    pub const ALL: [Op; 7] =
        [Op::Matmul, Op::AttentionMatmul, Op::Softmax, Op::Merge, Op::Copy, Op::Norm, Op::Guidance];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Op::Matmul => "matmul (linear, conv)",
            Op::AttentionMatmul => "attention (+softmax, CPU)",
            Op::Softmax => "softmax / block LSE",
            Op::Merge => "LSE merge",
            Op::Copy => "copies / concats / casts",
            Op::Norm => "norms",
            Op::Guidance => "guidance math",
        }
    }

    fn index(self) -> usize {
        Op::ALL.iter().position(|&o| o == self).unwrap_or(0)
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// What one thread has recorded since the last [`reset`].
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// Self time per class, indexed like [`Op::ALL`].
    pub time: [Duration; 7],
    /// Scopes entered per class.
    pub calls: [u64; 7],
    /// Bytes written by copies ([`copied`]).
    pub bytes_copied: u64,
}

impl Profile {
    /// Self time of `op`.
    pub fn of(&self, op: Op) -> Duration {
        self.time[op.index()]
    }

    /// Time of all classes together.
    pub fn total(&self) -> Duration {
        self.time.iter().sum()
    }
}

#[derive(Default)]
struct State {
    profile: Profile,
    /// Time spent in nested scopes, one entry per open scope.
    children: Vec<Duration>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Turn recording on or off (for every thread).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether recording is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Clear this thread's record.
pub fn reset() {
    STATE.with(|s| s.borrow_mut().profile = Profile::default());
}

/// This thread's record so far.
pub fn snapshot() -> Profile {
    STATE.with(|s| s.borrow().profile.clone())
}

/// An open scope; charges its self time to its class when dropped.
pub struct Scope {
    op: Op,
    start: Instant,
}

/// Open a scope of class `op` (`None`, at no cost, while recording is off).
#[must_use = "the scope measures until it is dropped"]
pub fn scope(op: Op) -> Option<Scope> {
    if !enabled() {
        return None;
    }
    STATE.with(|s| s.borrow_mut().children.push(Duration::ZERO));
    Some(Scope { op, start: Instant::now() })
}

impl Drop for Scope {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let nested = s.children.pop().unwrap_or_default();
            let i = self.op.index();
            s.profile.time[i] += elapsed.saturating_sub(nested);
            s.profile.calls[i] += 1;
            if let Some(parent) = s.children.last_mut() {
                *parent += elapsed;
            }
        });
    }
}

/// Record that a copy wrote `bytes`.
pub fn copied(bytes: usize) {
    if enabled() {
        STATE.with(|s| s.borrow_mut().profile.bytes_copied += bytes as u64);
    }
}

/// Run `f` as a scope of class `op`.
pub fn timed<T>(op: Op, f: impl FnOnce() -> T) -> T {
    let _scope = scope(op);
    f()
}

/// `Tensor::cat`, charged to [`Op::Copy`] with the bytes it writes.
pub fn cat<A: AsRef<candle_core::Tensor>, D: candle_core::shape::Dim>(
    parts: &[A],
    dim: D,
) -> candle_core::Result<candle_core::Tensor> {
    let _scope = scope(Op::Copy);
    let out = candle_core::Tensor::cat(parts, dim)?;
    copied(out.elem_count() * out.dtype().size_in_bytes());
    Ok(out)
}

/// `t.contiguous()`, charged to [`Op::Copy`] (with its bytes when it copies).
pub fn contiguous(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    if t.is_contiguous() {
        return Ok(t.clone());
    }
    let _scope = scope(Op::Copy);
    copied(t.elem_count() * t.dtype().size_in_bytes());
    t.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(ms: u64) {
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {}
    }

    #[test]
    fn nested_scopes_charge_self_time_and_nothing_when_off() {
        enable(true);
        reset();
        {
            let _outer = scope(Op::Merge);
            busy(20);
            let _inner = scope(Op::Copy);
            busy(20);
        }
        copied(12);
        let p = snapshot();
        enable(false);
        assert!(p.of(Op::Copy) >= Duration::from_millis(20));
        assert!(p.of(Op::Merge) >= Duration::from_millis(20));
        // The outer scope's self time excludes the inner one.
        assert!(p.of(Op::Merge) < Duration::from_millis(35), "{:?}", p.of(Op::Merge));
        assert_eq!((p.calls[Op::Merge.index()], p.bytes_copied), (1, 12));
        reset();
        assert!(scope(Op::Norm).is_none());
        copied(5);
        assert_eq!(snapshot().bytes_copied, 0);
    }
}
