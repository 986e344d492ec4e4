//! `allocator::reuse_freed_memory`: a large buffer freed and allocated again lands on pages
//! already mapped. Its own binary without the test harness (`harness = false`): the setting is
//! made first thing in `main`, before any other thread, as the `veto` binary makes it, and the
//! page-fault count is the process's.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    fn minor_faults() -> i64 {
        // SAFETY: getrusage fills the struct it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
        usage.ru_minflt
    }
    const BYTES: usize = 64 << 20; // above glibc's largest mmap threshold (32 MB)
    fn fill() {
        let mut buffer = vec![0u8; BYTES];
        for page in buffer.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&buffer);
    }
    fn check(place: &str) {
        fill(); // the first buffer maps its pages
        let before = minor_faults();
        fill();
        let faults = minor_faults() - before;
        // Without the setting every page of the second buffer faults again (16,384 of them).
        assert!(faults < (BYTES / 4096 / 8) as i64, "{place}: {faults} page faults for a reused 64 MB buffer");
    }
    assert!(veto::allocator::reuse_freed_memory(), "glibc refused the setting");
    check("main thread");
    // A thread started afterwards (as veto's worker pool) shares the main heap.
    std::thread::spawn(|| check("worker thread")).join().expect("worker thread");
    println!("test result: ok. 1 passed; 0 failed (allocator: freed 64 MB buffers reused without page faults)");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("test result: ok. 0 passed; 0 failed (allocator: not glibc, nothing to check)");
}
