//! The control socket (`<run-dir>/control.sock`): how client commands talk to the running agent.
//!
//! One JSON line per request, one JSON line per response, then the connection closes. The types in
//! `protocol` are shared by the server (in the daemon) and the client (in the CLI).

pub mod client;
pub mod document;
pub mod limits;
pub mod protocol;
pub mod server;
