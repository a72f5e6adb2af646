//! The I/O shell towards QEMU: processes, the QMP connection, observation, live changes, taps.
//!
//! Everything here executes decisions made by the pure core (`plan`, `argv`); nothing here
//! decides what the VM should look like.

pub mod process;
pub mod qmp;

pub use process::{find_running, list_vm_dirs, RunningQemu};
pub use qmp::{QemuEvent, Qmp, QmpError};
