//! The host's cordon (`plasmavmc evacuate` or `cordon`, until `plasmavmc uncordon`), kept in
//! `<state-dir>/cordon.json`: an agent restart or a reboot (the point of evacuating) finds the
//! host still closed and publishes it so from its first write on. The evacuation (what
//! `evacuate` set out to move, and how far it got) is kept beside it, in `evacuation.json`, so a
//! restarted agent finishes it; `uncordon` ends both.
//!
//! A cordon that cannot be read keeps the host cordoned: someone closed it on purpose, and
//! opening it by accident could fail a VM over onto a host about to reboot.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::evacuation::Evacuation;
pub use crate::status::Cordon;

/// The cordon file and what it holds; the evacuation file beside it.
pub struct Cordons {
    path: PathBuf,
    current: Option<Cordon>,
    evacuation: PathBuf,
}

impl Cordons {
    /// Reads `<state_dir>/cordon.json`. Unreadable or corrupt: cordoned, saying so.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("cordon.json");
        let evacuation = state_dir.join("evacuation.json");
        let current = match std::fs::read(&path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| unreadable(&path, &e.to_string())),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(unreadable(&path, &e.to_string())),
        };
        Cordons {
            path,
            current,
            evacuation,
        }
    }

    pub fn get(&self) -> Option<&Cordon> {
        self.current.as_ref()
    }

    /// Cordons the host (kept as it is when already cordoned), persisted before it takes
    /// effect: what the cluster sees never differs from what the next agent will read.
    pub fn cordon(&mut self, by: &str) -> Result<&Cordon> {
        if self.current.is_none() {
            let cordon = Cordon {
                since: crate::chainfire::records::now(),
                by: by.to_owned(),
            };
            let bytes = serde_json::to_vec_pretty(&cordon).expect("a cordon serializes");
            crate::files::write_atomically(&self.path, &bytes)?;
            self.current = Some(cordon);
        }
        Ok(self.current.as_ref().expect("just set"))
    }

    /// Opens the host again, which ends its evacuation; the previous cordon, if there was one.
    pub fn uncordon(&mut self) -> Result<Option<Cordon>> {
        for path in [&self.evacuation, &self.path] {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()))
                }
                _ => {}
            }
        }
        Ok(self.current.take())
    }

    /// The evacuation the previous agent kept, if the host is still cordoned. Unreadable: none
    /// (the cordon stays; `plasmavmc evacuate` starts a new one).
    pub fn saved_evacuation(&self) -> Option<Evacuation> {
        self.current.as_ref()?;
        let bytes = std::fs::read(&self.evacuation).ok()?;
        serde_json::from_slice(&bytes)
            .map_err(|e| {
                tracing::error!(path = %self.evacuation.display(), "the saved evacuation is unreadable ({e}); `plasmavmc evacuate` starts a new one");
            })
            .ok()
    }

    /// Keeps `evacuation` for the next agent, while the host is cordoned (never after
    /// `uncordon` ended it).
    pub fn save_evacuation(&self, evacuation: &Evacuation) -> Result<()> {
        if self.current.is_none() {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(evacuation).expect("an evacuation serializes");
        crate::files::write_atomically(&self.evacuation, &bytes)
    }
}

fn unreadable(path: &Path, error: &str) -> Cordon {
    let by = format!(
        "{} is unreadable ({error}); the host stays cordoned until `plasmavmc uncordon`",
        path.display()
    );
    tracing::error!("{by}");
    Cordon {
        since: crate::chainfire::records::now(),
        by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cordon_survives_a_reload_and_a_corrupt_file_counts_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut cordons = Cordons::load(dir.path());
        assert_eq!(cordons.get(), None);
        let first = cordons.cordon("evacuate").unwrap().clone();
        assert_eq!(cordons.cordon("cordon").unwrap(), &first, "kept as it was");
        assert_eq!(Cordons::load(dir.path()).get(), Some(&first));
        std::fs::write(dir.path().join("cordon.json"), b"{not json").unwrap();
        let corrupt = Cordons::load(dir.path());
        let kept = corrupt.get().expect("still cordoned");
        assert!(kept.by.contains("unreadable"), "{kept:?}");
        assert_eq!(cordons.uncordon().unwrap(), Some(first));
        assert_eq!(cordons.uncordon().unwrap(), None);
        assert_eq!(Cordons::load(dir.path()).get(), None);
    }

    #[test]
    fn the_evacuation_is_kept_while_cordoned_and_uncordon_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut cordons = Cordons::load(dir.path());
        let evacuation = Evacuation::start("t0".into(), &Default::default());
        cordons.save_evacuation(&evacuation).unwrap();
        assert_eq!(
            cordons.saved_evacuation(),
            None,
            "not cordoned: nothing kept"
        );
        cordons.cordon("evacuate").unwrap();
        cordons.save_evacuation(&evacuation).unwrap();
        assert_eq!(
            Cordons::load(dir.path()).saved_evacuation(),
            Some(evacuation.clone())
        );
        std::fs::write(dir.path().join("evacuation.json"), b"{not json").unwrap();
        assert_eq!(Cordons::load(dir.path()).saved_evacuation(), None);
        cordons.save_evacuation(&evacuation).unwrap();
        cordons.uncordon().unwrap();
        assert!(!dir.path().join("evacuation.json").exists());
        cordons.save_evacuation(&evacuation).unwrap();
        assert!(
            !dir.path().join("evacuation.json").exists(),
            "an evacuation ended by uncordon is not written again"
        );
    }
}
