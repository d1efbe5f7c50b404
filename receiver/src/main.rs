//! `receiver`: parse configuration, set up telemetry, bind the webhook and admin listeners, serve
//! until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: glibc's malloc, with the consolidation of freed
/// chunks its 50 KB bodies trigger, was about 6 % of the receiver's CPU per request under load
/// (`perf`, `bench/latest.md`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Receives Smartcar webhooks and makes them durable in Kafka.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (also CARHOOK_CONFIG); environment CARHOOK__SECTION__KEY overrides it.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match shared::config::Settings::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("receiver: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = settings.smartcar.tokens() {
        eprintln!("receiver: {e}");
        return ExitCode::from(2);
    }
    let telemetry = match shared::telemetry::init(&settings.telemetry, "carhook-receiver") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("receiver: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match shared::admin::bind(settings.receiver.listen, "receiver.listen").await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot bind");
            eprintln!("receiver: {e}");
            return ExitCode::from(1);
        }
    };
    let admin =
        match shared::admin::bind(settings.receiver.admin_listen, "receiver.admin_listen").await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot bind");
                eprintln!("receiver: {e}");
                return ExitCode::from(1);
            }
        };
    let shutdown = shared::shutdown::on_signal();
    let result = carhook_receiver::run(settings, listener, admin, shutdown).await;
    // Flushing exports over gRPC: keep it off the async worker threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("receiver: {e}");
            ExitCode::from(1)
        }
    }
}
