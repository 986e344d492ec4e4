//! Freed memory kept for reuse (glibc). A denoising step allocates and frees the same large
//! activations every layer — tens to hundreds of MB each at 1024². glibc serves blocks above
//! its mmap threshold (32 MB at most) with fresh mappings and unmaps them when freed, so the
//! kernel page-faults and zeroes every such buffer again, every layer: on SD3.5-Large at 1024²
//! (2-core VM) page faults took about 8% of the step, and NAG's log-sum-exp merge, whose one
//! new buffer is written once, went from 427 to 83–90 ms per step with this setting.
//!
//! [`reuse_freed_memory`] makes the one main heap serve every size and thread (`M_MMAP_MAX` 0,
//! `M_ARENA_MAX` 1) and keeps freed memory in the process (`M_TRIM_THRESHOLD` at its maximum),
//! so the next layer's buffers land on pages already mapped. The process keeps its peak memory
//! until it exits, which a generation run reaches anyway. The `veto` binary calls it at start;
//! a library user may.

/// Applies the setting; returns whether it did. It does nothing where the C library is not
/// glibc, when `VETO_MALLOC=system`, or when the user set any of the three parameters
/// (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`: theirs stand).
pub fn reuse_freed_memory() -> bool {
    let user_set = ["MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if user_set || std::env::var("VETO_MALLOC").is_ok_and(|v| v == "system") {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // One arena: a thread's own arena cannot grow past 64 MB and falls back to mmap whatever
    // M_MMAP_MAX says, and most buffers are allocated on the worker threads.
    // SAFETY: mallopt only changes glibc's allocation parameters (under its arena lock).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1) == 1
            && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}
