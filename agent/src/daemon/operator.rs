//! Operator `start`/`stop` decisions, persisted in `<state-dir>/operator.json` so that an agent
//! restart (or a host reboot) does not bring back a VM the operator stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OperatorIntent {
    /// `plasmavmc start`: run it even with `autostart = false`.
    Started,
    /// `plasmavmc stop`: keep it down until `plasmavmc start`.
    Stopped,
    /// `plasmavmc save`: keep it saved until `plasmavmc start`, which restores it.
    Saved,
}

#[derive(Debug)]
pub struct OperatorIntents {
    path: PathBuf,
    intents: BTreeMap<String, OperatorIntent>,
}

impl OperatorIntents {
    /// Loads `<state_dir>/operator.json` (absent: no operator decisions yet). A corrupt file
    /// (a crash mid-write on a filesystem that lies, a 0-byte file after a full disk) must not
    /// keep the agent from starting: it is moved aside with a timestamp, what it held is
    /// logged, and the agent starts with no operator decisions.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join("operator.json");
        let intents = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(intents) => intents,
                Err(e) => {
                    set_aside(&path, &bytes, &e);
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self { path, intents })
    }

    pub fn get(&self, vm: &str) -> Option<OperatorIntent> {
        self.intents.get(vm).copied()
    }

    /// Persists (atomically) the operator's decision for `vm`, then records it: a decision that
    /// could not be written (a full disk) takes no effect, so what runs never differs from what
    /// the next agent will read.
    #[cfg(test)]
    pub fn set(&mut self, vm: &str, intent: OperatorIntent) -> Result<()> {
        self.replace(self.change(vm, Some(intent)).intents)
    }

    /// The decisions with `intent` (`None`: no decision) for `vm`, to be written (`write`, off
    /// the async runtime: a hung state filesystem must not hold up anything else) and then put
    /// in force (`commit`).
    pub fn change(&self, vm: &str, intent: Option<OperatorIntent>) -> Change {
        let mut intents = self.intents.clone();
        match intent {
            Some(intent) => intents.insert(vm.to_owned(), intent),
            None => intents.remove(vm),
        };
        Change {
            path: self.path.clone(),
            intents,
        }
    }

    /// Puts a written `change` in force.
    pub fn commit(&mut self, change: Change) {
        self.intents = change.intents;
    }

    /// Forgets the operator `start` of every VM `declared` rejects: a VM taken out of the config
    /// and declared again later is a new declaration, and its `autostart` decides. (An operator
    /// `stop` is kept: keeping a VM down is the safe side.) Like `set`, only once persisted.
    pub fn forget_starts_of_undeclared(
        &mut self,
        declared: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let mut kept = self.intents.clone();
        kept.retain(|vm, intent| *intent != OperatorIntent::Started || declared(vm));
        let forgotten: Vec<String> = self
            .intents
            .keys()
            .filter(|vm| !kept.contains_key(*vm))
            .cloned()
            .collect();
        if !forgotten.is_empty() {
            self.replace(kept)?;
        }
        Ok(forgotten)
    }

    fn replace(&mut self, intents: BTreeMap<String, OperatorIntent>) -> Result<()> {
        let change = Change {
            path: self.path.clone(),
            intents,
        };
        change.write()?;
        self.commit(change);
        Ok(())
    }
}

/// Operator decisions not yet written (see `OperatorIntents::change`).
pub struct Change {
    path: PathBuf,
    intents: BTreeMap<String, OperatorIntent>,
}

impl Change {
    pub fn write(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.intents).expect("intents serialize");
        crate::files::write_atomically(&self.path, &json)
    }
}

/// Moves a corrupt intents file to `<path>.corrupt-<UTC time>` and says what was lost.
fn set_aside(path: &Path, bytes: &[u8], error: &serde_json::Error) {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    let content = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
    let kept = match std::fs::rename(path, &aside) {
        Ok(()) => format!("moved to {}", aside.display()),
        Err(e) => format!("could not be moved aside ({e}); the next start or stop replaces it"),
    };
    tracing::error!(
        "{} is corrupt ({error}; {} bytes), {kept}: operator starts/stops recorded there are \
         lost, every VM follows its autostart until started or stopped again; it held: {content:?}",
        path.display(),
        bytes.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut intents = OperatorIntents::load(dir.path()).unwrap();
        assert_eq!(intents.get("web"), None);
        intents.set("web", OperatorIntent::Stopped).unwrap();
        intents.set("db", OperatorIntent::Started).unwrap();
        let again = OperatorIntents::load(dir.path()).unwrap();
        assert_eq!(again.get("web"), Some(OperatorIntent::Stopped));
        assert_eq!(again.get("db"), Some(OperatorIntent::Started));
    }

    #[test]
    fn a_decision_that_cannot_be_written_takes_no_effect() {
        let dir = tempfile::tempdir().unwrap();
        let mut intents = OperatorIntents::load(&dir.path().join("missing")).unwrap();
        assert!(intents.set("web", OperatorIntent::Stopped).is_err());
        assert_eq!(intents.get("web"), None);
    }

    #[test]
    fn a_corrupt_file_is_set_aside_and_the_agent_starts_without_decisions() {
        let dir = tempfile::tempdir().unwrap();
        for corrupt in [&b""[..], b"{\"web\": \"stop"] {
            std::fs::write(dir.path().join("operator.json"), corrupt).unwrap();
            let intents = OperatorIntents::load(dir.path()).unwrap();
            assert_eq!(intents.get("web"), None);
            assert!(!dir.path().join("operator.json").exists());
        }
        let aside: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            !aside.is_empty()
                && aside
                    .iter()
                    .all(|n| n.starts_with("operator.json.corrupt-")),
            "{aside:?}"
        );
    }

    #[test]
    fn an_undeclared_vm_loses_its_operator_start_but_not_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut intents = OperatorIntents::load(dir.path()).unwrap();
        intents.set("gone", OperatorIntent::Started).unwrap();
        intents.set("down", OperatorIntent::Stopped).unwrap();
        intents.set("kept", OperatorIntent::Started).unwrap();
        let forgotten = intents
            .forget_starts_of_undeclared(|vm| vm == "kept")
            .unwrap();
        assert_eq!(forgotten, ["gone"]);
        let again = OperatorIntents::load(dir.path()).unwrap();
        assert_eq!(again.get("gone"), None);
        assert_eq!(again.get("down"), Some(OperatorIntent::Stopped));
        assert_eq!(again.get("kept"), Some(OperatorIntent::Started));
    }
}
