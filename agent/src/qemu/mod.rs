//! The I/O shell towards QEMU: processes, the QMP connection, observation, live changes, taps.
//!
//! Everything here executes decisions made by the pure core (`plan`, `argv`); nothing here
//! decides what the VM should look like.

pub mod backing;
pub mod cgroup;
pub mod confine;
pub mod guard;
pub mod images;
pub mod lifecycle;
pub mod live;
pub mod migrate;
pub mod observe;
pub mod passed;
pub mod process;
pub mod qmp;
pub mod save;
pub mod tap;

pub use confine::Confinement;
pub use guard::Guard;
pub use process::{find_running, list_vm_dirs, Found, Launcher, RunningQemu};
pub use qmp::{QemuEvent, Qmp, QmpError};
