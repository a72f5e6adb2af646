//! Host tap interfaces for bridged NICs. The agent creates, attaches and deletes only the taps it
//! names itself (`ids::agent_tap`); taps the operator declares (`tap = ...`) are never touched.
//! Everything goes through `ip` with an argv, never a shell.

use std::path::Path;
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

/// The bridge an interface is attached to, from sysfs.
pub fn bridge_of(interface: &str) -> Option<String> {
    let master = std::fs::read_link(format!("/sys/class/net/{interface}/master")).ok()?;
    Some(master.file_name()?.to_str()?.to_owned())
}

pub fn interface_exists(interface: &str) -> bool {
    Path::new("/sys/class/net").join(interface).exists()
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
