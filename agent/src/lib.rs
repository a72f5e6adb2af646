//! plasmavmc agent: a pure core (schema, validation, planning, QEMU argv) and an I/O shell
//! (processes, QMP, files, control socket, ChainFire).

pub mod action;
pub mod argv;
pub mod cgroup;
pub mod chainfire;
pub mod cli;
pub mod console;
pub mod control;
pub mod cordon;
pub mod daemon;
pub mod devices;
pub mod disk_image;
pub mod evacuation;
pub mod events;
pub mod files;
pub mod first_apply;
pub mod identity;
pub mod ids;
pub mod metrics;
pub mod migration;
pub mod observed;
pub mod paths;
pub mod placement;
pub mod plan;
pub mod qemu;
pub mod runas;
pub mod save;
pub mod seed;
pub mod spec;
pub mod status;
pub mod validate;
