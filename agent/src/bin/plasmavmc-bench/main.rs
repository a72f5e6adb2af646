//! `plasmavmc-bench`: measures the agent against the goals in docs/benchmarks.md.
//!
//! Benchmarks are a command, never a timed test: figures depend on the machine, so they are
//! printed (and recorded in docs/) rather than asserted.

mod plan;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "plasmavmc-bench", about = "Measure plasmavmc: planning, adoption, live changes")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Time a no-op plan (nothing changed) over many declared VMs. Pure CPU, no QEMU.
    Plan {
        #[arg(long, default_value_t = 1000)]
        vms: usize,
        #[arg(long, default_value_t = 200)]
        iterations: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Plan { vms, iterations } => {
            let summary = plan::run(vms, iterations);
            println!("no-op plan, {vms} VMs: {summary}");
        }
    }
    Ok(())
}
