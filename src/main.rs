//! The `rtgate` binary: load the configuration, start the gateway, stop it on a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rtgate::Settings;

/// How settings are layered; `--help` shows it after the options.
const LAYERS: &str = "\
Settings come in layers, later ones winning: the embedded defaults (every key is documented
in config/default.toml), the --config file, then environment variables RTGATE__SECTION__KEY,
e.g. RTGATE__SERVER__BIND=0.0.0.0:3000 or RTGATE__AUTH__MODE=jwt. Lists are comma separated:
RTGATE__AUTH__AUDIENCE=app,admin. An unknown key or an invalid value stops start-up with a
message naming the key.";

/// A real-time WebSocket gateway with rooms, Lua plugins and persisted history.
#[derive(Parser)]
#[command(version, after_help = LAYERS)]
struct Args {
    /// Configuration file (TOML) layered over the embedded defaults.
    #[arg(long, env = "RTGATE_CONFIG", hide_env_values = true)]
    config: Option<PathBuf>,
    /// Check the configuration and load every plugin, report problems, and exit
    /// (0: all good, 1: a plugin failed, 2: the configuration is invalid).
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match Settings::load(args.config.as_deref(), true) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("rtgate: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        let failures = rtgate::plugins::check_dir(&settings.plugins).await;
        for (file, error) in &failures {
            eprintln!("rtgate: {file}: {error}");
        }
        if failures.is_empty() {
            println!("configuration and plugins are valid");
            return ExitCode::SUCCESS;
        }
        return ExitCode::from(1);
    }
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.log.filter.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_default())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let running = match rtgate::start(settings).await {
        Ok(running) => running,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
