//! rtgate-bench: the load and benchmark tool for rtgate, and for any server that speaks
//! the seed's chat protocol (the reference Node `ws` server included).
//!
//! This file only wires things together: fix the time base, raise the file limit, parse
//! the command line, run one subcommand on a single-threaded runtime, save its JSON and
//! print its table. A single-threaded runtime is enough for orchestration and for the
//! idle and churn scenarios; the fan-out scenario starts its own load threads so that the
//! hot path owns them outright. Ctrl-C drops whatever is running, which kills any server
//! this tool started.

mod churn;
mod cli;
mod client;
mod compare;
mod error;
mod fanout;
mod idle;
mod inproc;
mod pacing;
mod procs;
mod report;
mod stalls;
mod stats;
mod wire;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::{BenchError, Context, Result};

fn main() -> ExitCode {
    pacing::init();
    let cli = Cli::parse();
    let fd_limit = match procs::raise_nofile_limit() {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("rtgate-bench: warning: cannot raise the open-file limit: {e}");
            1024
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rtgate-bench: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = dispatch(cli, fd_limit) => result,
            _ = tokio::signal::ctrl_c() => Err(BenchError::msg("interrupted")),
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("rtgate-bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs one subcommand; `Ok(false)` means it ran but a check failed (churn).
async fn dispatch(cli: Cli, fd_limit: u64) -> Result<bool> {
    let out = cli.out_dir.as_path();
    match cli.command {
        Command::Fanout(args) => {
            let r = fanout::run(&args).await?;
            finish(out, "fanout", &r, &fanout::table(&r))?;
        }
        Command::Idle(args) => {
            let r = idle::run(&args, fd_limit).await?;
            finish(out, "idle", &r, &idle::table(&r))?;
        }
        Command::Churn(args) => {
            let r = churn::run(&args).await?;
            finish(out, "churn", &r, &churn::table(&r))?;
            return Ok(r.pass);
        }
        Command::Compare(args) => {
            let r = compare::run(&args, fd_limit).await?;
            finish(out, "compare", &r, &compare::table(&r))?;
        }
        Command::LuaHop(args) => {
            let r = inproc::lua_hop(&args)?;
            finish(out, "lua-hop", &r, &inproc::lua_hop_table(&r))?;
        }
        Command::History(args) => {
            let r = inproc::history(&args)?;
            finish(out, "history", &r, &inproc::history_table(&r))?;
        }
        Command::Stalls(args) => {
            let r = stalls::run(args.seconds, args.cpus.map(|n| n as usize)).await?;
            finish(out, "stalls", &r, &stalls::table(&r))?;
        }
    }
    Ok(true)
}

fn finish<T: serde::Serialize>(out_dir: &Path, scenario: &str, result: &T, table: &str) -> Result<()> {
    println!("{table}");
    let path = report::write_json(out_dir, scenario, result).context("saving results")?;
    println!("{}", report::saved(&path));
    Ok(())
}
