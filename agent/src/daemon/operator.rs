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
}

#[derive(Debug)]
pub struct OperatorIntents {
    path: PathBuf,
    intents: BTreeMap<String, OperatorIntent>,
}

impl OperatorIntents {
    /// Loads `<state_dir>/operator.json` (absent: no operator decisions yet).
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join("operator.json");
        let intents = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not operator intents", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self { path, intents })
    }

    pub fn get(&self, vm: &str) -> Option<OperatorIntent> {
        self.intents.get(vm).copied()
    }

    /// Records and persists (atomically) the operator's decision for `vm`.
    pub fn set(&mut self, vm: &str, intent: OperatorIntent) -> Result<()> {
        self.intents.insert(vm.to_owned(), intent);
        let json = serde_json::to_vec_pretty(&self.intents).expect("intents serialize");
        crate::files::write_atomically(&self.path, &json)
    }
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
}
