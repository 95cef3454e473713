//! The policy model of the contract: permissions records and security profiles, judged per message
//! attempt against the device directory as of the attempt's `ts`.
//!
//! ```text
//!  registry change ──► CompiledRecord::compile (once per change: groups interned, lists sorted,
//!                      open levels flagged)  ──► Registry: VersionedTable<Uuid, CompiledRecord>
//!                      (event time) + Directory (the newest version as a slot and a block)
//!
//!  attempt row ──► requester registered? auth valid? (the job)  ──► target registered? (the job)
//!              ──► evaluate(): self/owner pass ─► fast path (nothing to check on either side)
//!                  ─► permissions: target's list for the level [+ token] [+ sender's receive list]
//!                  ─► restrictions of every applicable profile [+ sender's path restrictions]
//!              ──► at most one violation per finding kind
//! ```
//!
//! **The model.** A target's base permissions record has an allow and a deny list per access level
//! (`discover`, `send`, `receive`, `subscribe`, `configure`). Its security profiles apply to the
//! requesters their `applies_to` names (UUIDs, `group:NAME`, `"*"`); a profile may grant and deny
//! at any level for its audience and adds restrictions. An attempt is allowed when the base list or
//! an applicable profile allows it, no applicable deny list names the requester, and every
//! restriction of every applicable profile holds. The readings of the contract hold exactly: deny
//! wins everywhere; an empty base `allow` is open at `discover`, `send` and `receive` (a profile's
//! never is); `subscribe` and `configure` need the target's token and an allow entry; a `send`
//! also needs the sender's `receive` list (base or a profile that applies to the target) to admit
//! the target, and the sender's own profiles' path restrictions govern it; self and owner pass
//! every list and restriction.
//!
//! **Speed.** Group membership is resolved when a record is compiled (interned ids, sorted), never
//! per attempt; lists are sorted id sets. The newest version of every record is also flattened
//! into [`Directory`]: one 64-byte slot per UUID in an open-addressing table (registration time,
//! owner, groups, which levels admit everyone) and, for records with lists or restrictions to
//! judge, a block of a few lines in one arena. The policy job judges most attempts from the two
//! slots and at most one block line per party, without following a pointer, and hands the rest
//! (findings, older versions, rare shapes) to [`evaluate`], the reference.

pub mod compile;
pub mod directory;
pub mod eval;
pub mod geo;
pub mod restrictions;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use compile::{CompiledRecord, GroupInterner, Level};
pub use directory::{Directory, Registry};
pub use eval::{Attempt, Lookups, Route, Violation, evaluate, passes_at_once};
pub use geo::Location;
