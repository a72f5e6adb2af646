//! Shell completions and the man page, generated from the clap definitions (the Nix package
//! installs them; `generated_for_every_shell` keeps them generating in CI).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, EXIT_FAILED};

/// The completion script for `shell`.
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "plasmavmc", &mut out);
    out
}

/// The man pages into `dir`: `plasmavmc.1` and one `plasmavmc-COMMAND.1` per command.
pub fn manpages(dir: &Path) -> ExitCode {
    let result =
        std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(Cli::command(), dir));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writing man pages to {}: {e}", dir.display());
            ExitCode::from(EXIT_FAILED)
        }
    }
}

pub fn print(bytes: &[u8]) -> ExitCode {
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writing to stdout: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_for_every_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(completions(shell)).unwrap();
            for command in ["console", "reload", "status", "run-dir"] {
                assert!(script.contains(command), "{shell}: no {command}");
            }
        }
    }

    #[test]
    fn a_man_page_for_every_command() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(manpages(dir.path()), ExitCode::SUCCESS);
        let page = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert!(page("plasmavmc.1").contains("Exit codes"));
        assert!(page("plasmavmc-console.1").contains("Ctrl\\-]"));
        assert!(dir.path().join("plasmavmc-reload.1").exists());
    }
}
