//! Host tap interfaces for bridged NICs. The agent creates, attaches and deletes only the taps it
//! names itself (`ids::agent_tap`); taps the operator declares (`tap = ...`) are never touched.
//! Everything goes through `ip` with an argv, never a shell.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::ids;
use crate::runas::RunAs;

/// Makes `tap` exist, be attached to `bridge` and be up, owned by `owner` (who may then open it
/// without privileges: an unprivileged QEMU). Idempotent: an existing tap is re-attached (e.g.
/// after a crash between creating and attaching it); one with another owner is made anew (it is
/// called before QEMU opens the tap, so nobody holds it).
pub fn ensure_tap(tap: &str, bridge: &str, owner: Option<&RunAs>) -> Result<()> {
    if !ids::is_agent_tap(tap) {
        bail!("refusing to manage tap {tap}: not a name the agent makes");
    }
    if !interface_exists(bridge) {
        bail!("bridge {bridge} does not exist on this host");
    }
    if let Some(found) = link(tap) {
        if !found.owned_by(owner) {
            ip(&["link", "delete", "dev", tap])?;
        }
    }
    if !interface_exists(tap) {
        let mut add = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
        let (uid, gid) = owner.map_or((String::new(), String::new()), |o| {
            (o.uid.to_string(), o.gid.to_string())
        });
        if owner.is_some() {
            add.extend(["user", uid.as_str(), "group", gid.as_str()]);
        }
        ip(&add)?;
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
    linkinfo: Option<LinkInfo>,
}

#[derive(serde::Deserialize)]
struct LinkInfo {
    info_data: Option<TunInfo>,
}

/// A tun/tap's owner, as `ip -details` names it: a user name, or a number without one.
#[derive(serde::Deserialize)]
struct TunInfo {
    user: Option<String>,
}

impl Link {
    /// Whether the tap's owner is `owner` (`None`: no owner, root's alone).
    fn owned_by(&self, owner: Option<&RunAs>) -> bool {
        let user = self
            .linkinfo
            .as_ref()
            .and_then(|info| info.info_data.as_ref())
            .and_then(|data| data.user.as_deref());
        match (user, owner) {
            (None, None) => true,
            (Some(user), Some(owner)) => {
                user == owner.uid.to_string()
                    || nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner.uid))
                        .ok()
                        .flatten()
                        .is_some_and(|u| u.name == user)
            }
            _ => false,
        }
    }
}

/// `ip -json -details link show dev NAME`; `None` when there is no such interface.
fn link(interface: &str) -> Option<Link> {
    if interface.is_empty() {
        return None;
    }
    let output = Command::new("ip")
        .args(["-json", "-details", "link", "show", "dev", interface])
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
