//! Helpers shared by the integration tests (`mod support;` in a test file).
pub mod etcd;
pub mod guest;
pub mod local_etcd;
pub mod procs;
