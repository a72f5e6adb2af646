//! `plasmavmc`: the agent daemon and its client commands (see `cli`).

fn main() -> std::process::ExitCode {
    plasmavmc_agent::cli::run()
}
