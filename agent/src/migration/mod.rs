//! Live migration, the pure part: what a move carries (`running`: the configuration a VM runs
//! with, re-expressed for the target's command line), whether two hosts can do it (`compat`),
//! what the two agents write to ChainFire and how each reacts to a fault (`record`), what an
//! agent restarted mid-move does with the move it finds (`interrupted`), what a target keeps of
//! a move arriving and does with it after its agent was down (`arrival`), the port
//! range (`ports`), and what a move reports (`report`, `downtime`). The shell is `daemon::migration`.

pub mod arrival;
pub mod compat;
pub mod downtime;
pub mod interrupted;
pub mod ports;
pub mod record;
pub mod report;
pub mod running;

pub use record::{Answer, IncomingRecord, MigrationRecord, Mode, Phase};
pub use report::{MigrationOutcome, MigrationProgress};
pub use running::{Cpus, HotCpu, Layout, Placement, RunningConfig};
