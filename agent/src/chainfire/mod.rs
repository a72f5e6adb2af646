//! ChainFire (etcd v3 API): publishing this host's VMs, watching the cluster, detecting lost
//! hosts and HA failover with self-fencing.
//!
//! Pure core: `keys`, `records`, `events`, `view`, `reconcile`, `fence`. Shell: `session` (a
//! tokio task the daemon talks to through channels), `lease` (keep-alives), `store` (the writes),
//! `members` (which store member a connection goes to), `trust` (the lease trust file fence guards and the next agent read), `clock` (boot time).

mod backoff;
pub mod clock;
pub mod config;
pub mod events;
pub mod fence;
pub mod keys;
mod lease;
pub mod members;
pub mod moves;
pub mod reconcile;
pub mod records;
pub mod session;
mod store;
pub mod trust;
pub mod view;

pub use config::{ChainFireConfig, Password, TlsFiles};
pub use events::{StateEvent, StateSink};
pub use keys::VmKey;
pub use records::{HandleRecord, HostRecord, LocalVm, SpecSummary, VmRecord};
pub use session::{HaGate, Notice, Session, SessionHandle};
pub use view::ClusterView;
