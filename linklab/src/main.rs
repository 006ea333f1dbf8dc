//! `linklab`: the link lab by hand.
//!
//!     linklab up --both "delay=150ms,loss=3%,rate=1mbit"
//!     linklab cleanup
//!
//! `up` creates a lab, prints how to use it, and reads commands on stdin until `quit`
//! or end of input, then removes everything. A lab left behind by a killed `linklab`
//! is removed by `linklab cleanup` (or by the next lab created).

use std::io::BufRead;

use clap::{Parser, Subcommand};
use linklab::{spec, Dir, Lab, Side};

#[derive(Parser)]
#[command(
    name = "linklab",
    about = "Degraded links between network namespaces (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a lab and control it from stdin.
    Up {
        /// Conditions gateway → central, e.g. "delay=150ms,jitter=10ms,loss=3%,rate=1mbit,queue=64kb".
        #[arg(long, default_value = "")]
        up: String,
        /// Conditions central → gateway.
        #[arg(long, default_value = "")]
        down: String,
        /// Conditions both ways (applied before --up and --down).
        #[arg(long, default_value = "")]
        both: String,
        /// Seed of the loss and jitter draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Remove labs whose process is gone.
    Cleanup,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Cleanup => linklab::remove_stale()
            .map(|gone| println!("removed {} namespace(s): {gone:?}", gone.len()))
            .map_err(|e| e.to_string()),
        Cmd::Up {
            up,
            down,
            both,
            seed,
        } => run_up(&up, &down, &both, seed),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("linklab: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_up(up: &str, down: &str, both: &str, seed: u64) -> Result<(), String> {
    let base = spec::parse(both).map_err(|e| e.to_string())?;
    let up = spec::parse_onto(&base, up).map_err(|e| e.to_string())?;
    let down = spec::parse_onto(&base, down).map_err(|e| e.to_string())?;
    let lab = Lab::builder()
        .up(up)
        .down(down)
        .seed(seed)
        .start()
        .map_err(|e| e.to_string())?;
    println!(
        "lab up.\n  gateway: ip netns exec {} …   ({})\n  central: ip netns exec {} …   ({})",
        lab.namespace(Side::Gateway),
        lab.addr(Side::Gateway),
        lab.namespace(Side::Central),
        lab.addr(Side::Central),
    );
    println!("commands: up SPEC | down SPEC | both SPEC | outage on|off | show | quit");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (cmd, arg) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        let dirs: &[Dir] = match cmd {
            "up" => &[Dir::Up],
            "down" => &[Dir::Down],
            "both" => &[Dir::Up, Dir::Down],
            "outage" => {
                lab.outage(arg.trim() == "on");
                &[]
            }
            "show" => {
                for d in [Dir::Up, Dir::Down] {
                    println!("{d:?}: {:?}\n     {:?}", lab.conditions(d), lab.stats(d));
                }
                &[]
            }
            "quit" | "exit" => break,
            "" => &[],
            other => {
                println!("unknown command {other:?}");
                &[]
            }
        };
        for d in dirs {
            match spec::parse_onto(&lab.conditions(*d), arg) {
                Ok(c) => lab.set(*d, c),
                Err(e) => println!("{e}"),
            }
        }
    }
    drop(lab);
    println!("lab removed");
    Ok(())
}
