//! The worker's background threads (the checkpoint writer, the timing trainer) yield the CPU to
//! the pipeline's thread: on two cores shared with librdkafka's threads (and, in the benches, the
//! broker and the publisher), a checkpoint write of a few hundred milliseconds of CPU that runs at
//! the pipeline's priority delays the micro-batches it overlaps, and that is event → finding
//! latency. Their work is not urgent: the next checkpoint waits for the previous one, and a model
//! trained a little later is swapped in a little later.

/// How much lower than the process's a background thread's priority is (a nice value; Linux
/// gives a thread about 10 % of the CPU time of a thread 10 nice values above it when both want
/// the same core, and all of it when the core is otherwise idle).
pub(crate) const BACKGROUND_NICE_INCREMENT: i32 = 10;

/// Lowers the calling thread's CPU priority by [`BACKGROUND_NICE_INCREMENT`] (at most to 19).
/// Only Linux sets a priority per thread; elsewhere, and if the system refuses, the thread keeps
/// its priority (and says so at debug level): a background thread at the pipeline's priority is
/// slower to yield, not wrong.
pub(crate) fn lower_priority(thread: &str) {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let tid = Some(rustix::thread::gettid());
        let result = getpriority_process(tid).and_then(|nice| setpriority_process(tid, (nice + BACKGROUND_NICE_INCREMENT).min(19)));
        if let Err(e) = result {
            tracing::debug!(message = "Could not lower a background thread's priority.", thread, error = %e);
        }
    }
    #[cfg(not(target_os = "linux"))]
    tracing::debug!(message = "Background threads keep the process's priority on this system.", thread);
}

/// How long the calling thread has run on a CPU and how long it has waited, runnable, for one, since
/// it started (Linux's `/proc/thread-self/schedstat`): the difference of two readings tells whether
/// a slow step was work or waiting for a core. `None` where the system does not keep them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SchedTimes {
    pub on_cpu: std::time::Duration,
    pub waiting: std::time::Duration,
}

impl SchedTimes {
    /// The calling thread's times now.
    pub(crate) fn now() -> Option<Self> {
        #[cfg(target_os = "linux")]
        {
            let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
            let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u64>().ok());
            let on_cpu = fields.next()??;
            let waiting = fields.next()??;
            Some(Self { on_cpu: std::time::Duration::from_nanos(on_cpu), waiting: std::time::Duration::from_nanos(waiting) })
        }
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// The time run and waited since `earlier`, in milliseconds: `(on_cpu, waiting)`.
    pub(crate) fn since_ms(self, earlier: Self) -> (f64, f64) {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        (ms(self.on_cpu.saturating_sub(earlier.on_cpu)), ms(self.waiting.saturating_sub(earlier.waiting)))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The nice value of one of this process's threads, from `/proc` (field 19 of its `stat`).
    fn nice_of(tid: rustix::process::Pid) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{}/stat", tid.as_raw_nonzero())).unwrap();
        // The command name (field 2) is in parentheses and may hold spaces: count after it.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn a_background_thread_runs_at_a_lower_priority_and_the_others_keep_theirs() {
        let own = nice_of(rustix::thread::gettid());
        let (background, others) = std::thread::spawn(move || {
            lower_priority("test");
            let background = nice_of(rustix::thread::gettid());
            let sibling = std::thread::spawn(|| nice_of(rustix::thread::gettid())).join().unwrap();
            (background, sibling)
        })
        .join()
        .unwrap();
        assert_eq!(background, (own + BACKGROUND_NICE_INCREMENT).min(19), "the thread that asked is lowered");
        assert_eq!(nice_of(rustix::thread::gettid()), own, "the calling thread's priority is its own");
        // A thread inherits its creator's nice value on Linux: work spawned from a background
        // thread stays in the background.
        assert_eq!(others, background);
    }

    #[test]
    fn a_busy_thread_reads_its_time_on_a_cpu_grow_and_a_sleeping_one_not() {
        let before = SchedTimes::now().expect("Linux keeps per-thread scheduler times");
        // Spins until the reading shows 20 ms on a CPU; a reading that does not grow fails at 10 s.
        let spin = std::time::Instant::now();
        let busy = loop {
            let now = SchedTimes::now().unwrap();
            if now.since_ms(before).0 >= 20.0 {
                break now;
            }
            assert!(spin.elapsed() < std::time::Duration::from_secs(10), "10 s of spinning never read 20 ms on a CPU");
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (ran, _) = SchedTimes::now().unwrap().since_ms(busy);
        assert!(ran < 5.0, "a sleep of 50 ms does not run, read {ran} ms on a CPU");
    }
}
