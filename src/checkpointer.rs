//! Writing checkpoints off the pipeline's thread.
//!
//! A checkpoint's snapshot is taken on the pipeline's thread (steps 1–3 of the protocol in
//! [`crate::pipeline`]), and the archive's open files are handed over with it, as is the output
//! sink's [`Cut`] at that moment. Waiting for the broker to acknowledge the outputs sent before the
//! cut, closing those files and writing the checkpoint durably (a file per partition and one for
//! the global tables, each fsynced and renamed into place) take tens to hundreds of milliseconds;
//! the [`Checkpointer`]'s thread does that, in that order, while the pipeline goes on judging
//! attempts. When the write is durable the pipeline gets it back ([`Checkpointer::try_done`]) and
//! only then commits the checkpoint's offsets. The thread runs at a lower CPU priority than the
//! pipeline's (see [`crate::background`]).
//!
//! One checkpoint is written at a time: a checkpoint falling due while the previous one is still
//! being written waits for the next turn of the loop. Before the group takes partitions away, the
//! revoke hook waits for the write in progress ([`IdleWaiter`]), so this worker never writes a
//! partition's file after its next owner has started to.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use meshguard_analytics::{Checkpoint, CheckpointStore, LocalCheckpointStore, Position, Recycled};
use meshguard_ingest::archive::Closing;
use meshguard_ingest::{Cut, KafkaSink};

/// The outputs a checkpoint covers: every record the sink had been given at its cut, to be on the
/// broker before the checkpoint is written.
pub(crate) struct Outputs {
    pub sink: Arc<KafkaSink>,
    pub cut: Cut,
    /// How long the broker may take to acknowledge them.
    pub timeout: Duration,
}

/// A checkpoint to write, the archive files to close before it, and the input offsets to commit
/// once it is durable.
struct Job {
    outputs: Option<Outputs>,
    closing: Vec<Closing>,
    checkpoint: Checkpoint,
    offsets: Vec<Position>,
    started: Instant,
}

/// A checkpoint written (or not).
#[derive(Debug)]
pub(crate) struct Done {
    /// The input offsets it holds: to commit now.
    pub offsets: Vec<Position>,
    /// Whether it is durable (its archive files closed, then its files written).
    pub result: anyhow::Result<()>,
    /// When its snapshot began (before the flush).
    pub started: Instant,
    /// How long the write took.
    pub write: Duration,
    /// The checkpoint's tables' mirrors, for the engine to take back ([`meshguard_analytics::Engine::recycle`]):
    /// the next checkpoint copies only what changed since.
    pub recycled: Recycled,
}

/// Whether a write is in progress, shared with the revoke hook.
#[derive(Debug, Clone, Default)]
pub(crate) struct IdleWaiter(Arc<(Mutex<bool>, Condvar)>);

impl IdleWaiter {
    fn set_busy(&self, busy: bool) {
        let (lock, idle) = &*self.0;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = busy;
        if !busy {
            idle.notify_all();
        }
    }

    /// Returns once no checkpoint is being written.
    pub fn wait(&self) {
        let (lock, idle) = &*self.0;
        let busy = lock.lock().unwrap_or_else(PoisonError::into_inner);
        drop(idle.wait_while(busy, |busy| *busy).unwrap_or_else(PoisonError::into_inner));
    }
}

/// The checkpoint-writing thread. See the module docs.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    idle: IdleWaiter,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread writing to `store`.
    pub fn start(store: LocalCheckpointStore) -> std::io::Result<Self> {
        let (jobs, job_rx) = sync_channel::<Job>(1);
        let (done_tx, done) = sync_channel::<Done>(1);
        let idle = IdleWaiter::default();
        let thread_idle = idle.clone();
        let thread = std::thread::Builder::new().name("meshguard-checkpoint".into()).spawn(move || {
            crate::background::lower_priority("meshguard-checkpoint");
            for mut job in job_rx {
                let began = Instant::now();
                // The outputs the checkpoint says were sent are on the broker, and the archive
                // holds every attempt it calls consumed: both before the checkpoint.
                let delivered = job.outputs.map_or(Ok(()), |o| o.sink.wait_cut(o.cut, o.timeout));
                let result = delivered
                    .context("delivering the outputs sent before a checkpoint")
                    .and_then(|()| {
                        job.closing.into_iter().try_for_each(|c| c.finish().map(drop)).context("closing archive files before a checkpoint")
                    })
                    .and_then(|()| store.save(&mut job.checkpoint).map_err(anyhow::Error::from));
                // What the engine does not take back is dropped here, not on the pipeline's thread.
                let recycled = job.checkpoint.into_recycled();
                thread_idle.set_busy(false);
                let done = Done { offsets: job.offsets, result, started: job.started, write: began.elapsed(), recycled };
                if done_tx.send(done).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self { jobs: Some(jobs), done, idle, in_flight: false, thread: Some(thread) })
    }

    /// A handle that waits for the write in progress (for the revoke hook).
    pub fn waiter(&self) -> IdleWaiter {
        self.idle.clone()
    }

    /// Whether a checkpoint was handed over and its result not yet taken.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Hands a checkpoint over for writing, once `outputs` (if any) are on the broker. Call only
    /// when not [`in_flight`](Self::in_flight).
    pub fn submit(
        &mut self,
        outputs: Option<Outputs>,
        closing: Vec<Closing>,
        checkpoint: Checkpoint,
        offsets: Vec<Position>,
        started: Instant,
    ) -> anyhow::Result<()> {
        debug_assert!(!self.in_flight, "one checkpoint at a time");
        self.idle.set_busy(true);
        let sent = self.jobs.as_ref().is_some_and(|jobs| jobs.send(Job { outputs, closing, checkpoint, offsets, started }).is_ok());
        if !sent {
            self.idle.set_busy(false);
            anyhow::bail!("the checkpoint thread has stopped");
        }
        self.in_flight = true;
        Ok(())
    }

    /// The result of the checkpoint in flight, if it is written.
    pub fn try_done(&mut self) -> Option<anyhow::Result<Done>> {
        if !self.in_flight {
            return None;
        }
        match self.done.try_recv() {
            Ok(done) => {
                self.in_flight = false;
                Some(Ok(done))
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.in_flight = false;
                Some(Err(anyhow::anyhow!("the checkpoint thread stopped while writing")))
            }
        }
    }

    /// Waits for the checkpoint in flight, if any, and returns its result.
    pub fn wait_done(&mut self) -> Option<anyhow::Result<Done>> {
        if !self.in_flight {
            return None;
        }
        self.in_flight = false;
        Some(self.done.recv().map_err(|_| anyhow::anyhow!("the checkpoint thread stopped while writing")))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once the write in progress, if any, is done.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use meshguard_schemas::InputTopic;

    #[test]
    fn a_checkpoint_is_durable_when_its_result_comes_back_and_one_is_written_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalCheckpointStore::open(dir.path()).unwrap();
        let mut writer = Checkpointer::start(store.clone()).unwrap();
        assert!(writer.try_done().is_none(), "nothing in flight");
        let offsets = vec![Position { topic: InputTopic::Messages, partition: 0, next_offset: 42 }];
        writer.submit(None, Vec::new(), Checkpoint::default(), offsets.clone(), Instant::now()).unwrap();
        assert!(writer.in_flight());
        let done = writer.wait_done().unwrap().unwrap();
        assert!(done.result.is_ok());
        assert_eq!(done.offsets, offsets);
        assert!(!writer.in_flight());
        // Written: the global part is on disk.
        assert!(store.load_global().unwrap().is_some());
        // The revoke hook's wait returns at once when nothing is being written.
        writer.waiter().wait();
    }

    #[test]
    fn a_failed_write_comes_back_as_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalCheckpointStore::open(dir.path().join("ckpt")).unwrap();
        // The directory disappears under the store: the write must fail, not pass silently.
        std::fs::remove_dir_all(dir.path().join("ckpt")).unwrap();
        let mut writer = Checkpointer::start(store).unwrap();
        writer.submit(None, Vec::new(), Checkpoint::default(), Vec::new(), Instant::now()).unwrap();
        let done = writer.wait_done().unwrap().unwrap();
        assert!(done.result.is_err());
    }
}
