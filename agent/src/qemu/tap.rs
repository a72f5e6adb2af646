//! Host tap interfaces for bridged NICs. The agent creates, attaches and deletes only the taps it
//! names itself (`ids::agent_tap`); taps the operator declares (`tap = ...`) are never touched.
//! Everything goes through `ip` with an argv, never a shell.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::ids;

/// Makes `tap` exist, be attached to `bridge` and be up. Idempotent: an existing tap is
/// re-attached (e.g. after a crash between creating and attaching it).
pub fn ensure_tap(tap: &str, bridge: &str) -> Result<()> {
    if !ids::is_agent_tap(tap) {
        bail!("refusing to manage tap {tap}: not a name the agent makes");
    }
    if !interface_exists(bridge) {
        bail!("bridge {bridge} does not exist on this host");
    }
    if !interface_exists(tap) {
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    }
    if bridge_of(tap).as_deref() != Some(bridge) {
        ip(&["link", "set", "dev", tap, "master", bridge])?;
    }
    ip(&["link", "set", "dev", tap, "up"])
}

/// Deletes an agent-made tap; a missing one is fine (already deleted).
pub fn delete_tap(tap: &str) -> Result<()> {
    if !ids::is_agent_tap(tap) {
        bail!("refusing to delete tap {tap}: not a name the agent makes");
    }
    if !interface_exists(tap) {
        return Ok(());
    }
    ip(&["link", "delete", "dev", tap])
}

/// The bridge an interface is attached to. Asked of `ip` rather than sysfs, whose view is the
/// network namespace it was mounted in, not necessarily ours.
pub fn bridge_of(interface: &str) -> Option<String> {
    link(interface)?.master
}

pub fn interface_exists(interface: &str) -> bool {
    link(interface).is_some()
}

#[derive(serde::Deserialize)]
struct Link {
    master: Option<String>,
}

/// `ip -json link show dev NAME`; `None` when there is no such interface.
fn link(interface: &str) -> Option<Link> {
    if interface.is_empty() {
        return None;
    }
    let output = Command::new("ip")
        .args(["-json", "link", "show", "dev", interface])
        .output()
        .ok()?;
    let links: Vec<Link> = serde_json::from_slice(&output.stdout).ok()?;
    links.into_iter().next()
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
