//! Whether a VM can move from one host to another before anything starts: both QEMUs the same
//! version, the machine type the same on both, the target reachable and speaking the same
//! migration transport (plain or TLS).

use crate::chainfire::records::HostFacts;
use crate::spec::{Machine, VmSpec};

/// The machine type alias the agent launches a spec with (`argv` uses the unversioned alias;
/// each QEMU resolves it to its newest versioned type).
pub fn machine_alias(spec: &VmSpec) -> &'static str {
    match spec.machine {
        Machine::Q35 => "q35",
        Machine::Pc => "pc",
    }
}

/// Why VM `spec` cannot migrate from a host with `source` facts to `target` (named `to`), or
/// Ok with the target's migration address and port range.
pub fn check(
    spec: &VmSpec,
    source: &HostFacts,
    to: &str,
    target: &HostFacts,
) -> Result<(), String> {
    let Some(_) = &target.migration_address else {
        return Err(format!(
            "host {to} publishes no migration address (its agent predates live migration); upgrade it first"
        ));
    };
    match (&source.qemu_version, &target.qemu_version) {
        (Some(ours), Some(theirs)) if ours == theirs => {}
        (ours, theirs) => {
            return Err(format!(
                "QEMU versions differ: this host has {}, {to} has {}; both must run the same QEMU",
                ours.as_deref().unwrap_or("an unknown version"),
                theirs.as_deref().unwrap_or("an unknown version")
            ))
        }
    }
    let alias = machine_alias(spec);
    match (
        source.machine_types.get(alias),
        target.machine_types.get(alias),
    ) {
        (Some(ours), Some(theirs)) if ours == theirs => {}
        (ours, theirs) => {
            return Err(format!(
                "machine type {alias} differs: here {}, on {to} {}",
                ours.map_or("unknown", String::as_str),
                theirs.map_or("unknown", String::as_str)
            ))
        }
    }
    if source.migration_tls != target.migration_tls {
        let (tls, plain) = if source.migration_tls {
            ("this host", to)
        } else {
            (to, "this host")
        };
        return Err(format!(
            "{tls} migrates over TLS (--migration-tls-dir) but {plain} does not; configure both the same"
        ));
    }
    Ok(())
}

/// The versioned machine types behind aliases, from `qemu -machine help` (lines like
/// `q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)`).
pub fn parse_machine_help(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let alias = line.split_whitespace().next()?;
            let target = line.rsplit_once("(alias of ")?.1.strip_suffix(')')?;
            Some((alias.to_owned(), target.trim().to_owned()))
        })
        .collect()
}

/// `major.minor.micro` from `qemu --version` (`QEMU emulator version 7.2.15 (Debian ...)`).
pub fn parse_version(text: &str) -> Option<String> {
    let rest = text.lines().next()?.split("version ").nth(1)?;
    rest.split_whitespace().next().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(version: &str, q35: &str) -> HostFacts {
        HostFacts {
            migration_address: Some("10.0.0.2".into()),
            migration_ports: Some("49152-49215".into()),
            migration_tls: false,
            qemu_version: Some(version.into()),
            machine_types: [("q35".to_owned(), q35.to_owned())].into(),
        }
    }

    fn spec() -> VmSpec {
        serde_json::from_value(serde_json::json!({"vcpus": 1, "memoryMiB": 64, "kernel": "/k"}))
            .unwrap()
    }

    #[test]
    fn same_qemu_and_machine_may_move() {
        let f = facts("7.2.15", "pc-q35-7.2");
        assert_eq!(check(&spec(), &f, "h2", &f.clone()), Ok(()));
    }

    #[test]
    fn mismatches_are_refused_naming_both_sides() {
        let ours = facts("7.2.15", "pc-q35-7.2");
        let e = check(&spec(), &ours, "h2", &facts("8.0.0", "pc-q35-8.0")).unwrap_err();
        assert!(
            e.contains("7.2.15") && e.contains("8.0.0") && e.contains("h2"),
            "{e}"
        );
        let e = check(&spec(), &ours, "h2", &facts("7.2.15", "pc-q35-7.1")).unwrap_err();
        assert!(e.contains("pc-q35-7.2") && e.contains("pc-q35-7.1"), "{e}");
        let old = HostFacts::default();
        let e = check(&spec(), &ours, "h2", &old).unwrap_err();
        assert!(e.contains("no migration address"), "{e}");
        let tls = HostFacts {
            migration_tls: true,
            ..ours.clone()
        };
        let e = check(&spec(), &ours, "h2", &tls).unwrap_err();
        assert!(e.contains("TLS"), "{e}");
    }

    #[test]
    fn qemu_outputs_parse() {
        let help = "Supported machines are:\npc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\npc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\nq35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n";
        let types = parse_machine_help(help);
        assert_eq!(types["q35"], "pc-q35-7.2");
        assert_eq!(types["pc"], "pc-i440fx-7.2");
        assert_eq!(types.len(), 2);
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u12)\nCopyright"),
            Some("7.2.15".into())
        );
    }
}
