//! The global tables' part of a checkpoint, kept off the pipeline's thread.
//!
//! The registry, presence and locations are copied whole by a snapshot, and they are not small:
//! a location per located attempt within the allowed lateness (half a million versions at
//! 80 k attempts/s), a directory of every UUID. Instead, the checkpoint thread keeps a *replica*
//! of them, and the engine keeps a *log* of what it did to its own tables since the replica's
//! state (each insert and observation, in order, per table, and the prunes between them). At a
//! checkpoint the engine hands the replica and the log over and starts a new log: the pause copies
//! nothing of the tables. The checkpoint thread ([`super::checkpoint::Checkpoint::settle`]) applies
//! the log to the replica with the engine's own operations, prunes included, and writes the
//! checkpoint's global tables from it; then it hands the replica back, with the log's emptied
//! buffers for the next log ([`super::checkpoint::Checkpoint::into_recycled`]).
//!
//! A checkpoint taken while the replica is not home (the first one, one after a restore, a
//! replica lost with a failed write, or a log given up for growing longer than the tables:
//! [`GlobalTracker::bound`]) copies the tables in the pause as before, and the checkpoint thread
//! builds the replica from that copy, as a restore would.

use uuid::Uuid;

use super::checkpoint::RecordText;
use crate::policy::Location;
use crate::tables::{TableSnapshot, VersionedTable};

/// The log's length below which it is always kept (see [`GlobalTracker::bound`]): 64 MB or so.
pub(super) const LOG_MIN_ENTRIES: usize = 1 << 20;

/// The global tables as a checkpoint writes them, kept by the checkpoint thread.
#[derive(Debug, Clone, Default)]
pub(super) struct GlobalReplica {
    registry: VersionedTable<Uuid, Option<RecordText>>,
    presence: VersionedTable<Uuid, bool>,
    locations: VersionedTable<Uuid, Location>,
}

/// What the engine did to its global tables since the replica's state, per table in order.
#[derive(Debug, Clone, Default)]
pub(super) struct GlobalLog {
    /// Registry versions inserted (`VersionedTable::insert`).
    pub(super) registry: Vec<(Uuid, i64, Option<RecordText>)>,
    /// Presence observed (`VersionedTable::assert`).
    pub(super) presence: Vec<(Uuid, i64, bool)>,
    /// Locations observed (`VersionedTable::assert`).
    pub(super) locations: Vec<(Uuid, i64, Location)>,
    /// Prunes of all three tables: the horizon, after how many entries of each table's log.
    pub(super) prunes: Vec<(i64, [usize; 3])>,
}

impl GlobalLog {
    /// Entries over all tables.
    pub(super) fn len(&self) -> usize {
        self.registry.len() + self.presence.len() + self.locations.len()
    }

    /// Empties the log, keeping its buffers.
    pub(super) fn clear(&mut self) {
        self.registry.clear();
        self.presence.clear();
        self.locations.clear();
        self.prunes.clear();
    }

    /// Records a prune of the tables at `horizon`, after what is logged so far.
    pub(super) fn prune(&mut self, horizon: i64) {
        self.prunes.push((horizon, [self.registry.len(), self.presence.len(), self.locations.len()]));
    }
}

/// The global part of a checkpoint still to be settled by the checkpoint thread: the replica as of
/// the previous checkpoint and what happened since, or (no replica home) the tables copied at the
/// cut, to build one from.
#[derive(Debug, Clone)]
pub(super) enum Pending {
    /// Apply `log` to `replica`.
    Changes { replica: Box<GlobalReplica>, log: GlobalLog },
    /// The tables were copied into the checkpoint's snapshot: build the replica from it.
    Build,
    /// Applied, and the checkpoint's tables written from it: the replica to hand back.
    Settled(Box<GlobalReplica>),
}

/// The replica travelling with a checkpoint, with the engine's restore count when it left: a
/// replica of tables restored since is stale.
#[derive(Debug, Clone)]
pub(super) struct Settling {
    pub(super) pending: Pending,
    pub(super) epoch: u64,
    /// The applied log, emptied, for its buffers: the engine's next log reuses them rather than
    /// growing fresh ones (and touching fresh pages) at every checkpoint.
    pub(super) spare: Option<GlobalLog>,
}

/// The engine's side: the log, and the replica when it is home.
#[derive(Debug, Default)]
pub(super) struct GlobalTracker {
    /// Changes since the replica's state; `None` while there is no replica anywhere (before the
    /// first checkpoint, after a restore), when nothing needs recording.
    pub(super) log: Option<GlobalLog>,
    /// The replica, when the checkpoint thread has handed it back.
    pub(super) home: Option<Box<GlobalReplica>>,
    /// Restores so far (see [`Settling::epoch`]).
    pub(super) epoch: u64,
    /// An emptied log to start the next one with (see [`Settling::spare`]).
    pub(super) spare: Option<GlobalLog>,
}

impl GlobalTracker {
    /// What a checkpoint takes: the replica and the log when the replica is home, otherwise
    /// [`Pending::Build`] (the caller copies the tables); a new log starts at this cut either way.
    pub(super) fn cut(&mut self) -> Settling {
        let pending = match (self.home.take(), self.log.take()) {
            (Some(replica), Some(log)) => Pending::Changes { replica, log },
            _ => Pending::Build,
        };
        self.log = Some(self.spare.take().unwrap_or_default());
        Settling { pending, epoch: self.epoch, spare: None }
    }

    /// Takes a replica back from a written checkpoint, unless the tables were restored since.
    pub(super) fn recycle(&mut self, replica: Box<GlobalReplica>, epoch: u64, spare: Option<GlobalLog>) {
        if epoch == self.epoch && self.log.is_some() {
            self.home = Some(replica);
            self.spare = spare;
        }
    }

    /// Gives the replica up when the log has grown past what copying the tables at the next cut
    /// costs (checkpoints far apart, or a replica that never came back): at least
    /// [`LOG_MIN_ENTRIES`], four per key of the tables (`keys`). The next checkpoint copies the
    /// tables and starts over. Returns whether it did.
    pub(super) fn bound(&mut self, keys: usize) -> bool {
        let too_long = self.log.as_ref().is_some_and(|log| log.len() > LOG_MIN_ENTRIES.max(4 * keys));
        if too_long {
            self.reset();
        }
        too_long
    }

    /// Forgets the replica and the log (the tables were replaced by a restore).
    pub(super) fn reset(&mut self) {
        self.log = None;
        self.home = None;
        self.spare = None;
        self.epoch += 1;
    }
}

impl GlobalReplica {
    /// A replica of the tables a snapshot holds, restored the way [`super::Engine::restore_global`]
    /// restores them.
    pub(super) fn from_snapshot(
        registry: &TableSnapshot<Uuid, Option<RecordText>>,
        presence: &TableSnapshot<Uuid, bool>,
        locations: &TableSnapshot<Uuid, Location>,
    ) -> Self {
        let mut r = Self::default();
        r.registry.insert_rows(&registry.rows);
        r.presence.assert_rows(&presence.rows);
        r.locations.assert_rows(&locations.rows);
        r
    }

    /// Applies the engine's changes and prunes, in their order.
    pub(super) fn apply(&mut self, log: &GlobalLog) {
        let mut done = [0; 3];
        let ends = log.prunes.iter().map(|(h, at)| (Some(*h), *at));
        for (horizon, at) in ends.chain([(None, [log.registry.len(), log.presence.len(), log.locations.len()])]) {
            self.registry.insert_rows(&log.registry[done[0]..at[0]]);
            self.presence.assert_rows(&log.presence[done[1]..at[1]]);
            self.locations.assert_rows(&log.locations[done[2]..at[2]]);
            done = at;
            if let Some(h) = horizon {
                self.registry.prune(h);
                self.presence.prune(h);
                self.locations.prune(h);
            }
        }
    }

    /// The tables as a checkpoint writes them.
    #[allow(clippy::type_complexity)]
    pub(super) fn snapshot(&self) -> (TableSnapshot<Uuid, Option<RecordText>>, TableSnapshot<Uuid, bool>, TableSnapshot<Uuid, Location>) {
        (self.registry.snapshot(Clone::clone), self.presence.snapshot(|v| *v), self.locations.snapshot(|v| *v))
    }
}
