//! `processor`: the consumer service and the operator subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use carhook_processor::tools::Output;
use clap::{Parser, Subcommand};
use shared::config::Settings;

/// Turns Smartcar events into vehicle state; operator tools for state, migrations.
#[derive(Parser)]
#[command(version, about, after_help = carhook_processor::tools::EXIT_CODES)]
struct Args {
    /// TOML configuration file (also CARHOOK_CONFIG); environment CARHOOK__SECTION__KEY overrides it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the events topic (the default).
    Run,
    /// Apply CQL migrations and create topics, then exit.
    Migrate,
    /// Print a vehicle's current state (JSON, or a table); exit 3 for an unknown vehicle.
    #[command(after_help = carhook_processor::tools::EXIT_CODES)]
    State {
        /// The vehicle id.
        vehicle_id: String,
        /// Also print `lastEvent`: the last event applied (bookkeeping, not part of the document).
        #[arg(long)]
        last_event: bool,
        /// `json` (default) or `table`.
        #[arg(long, value_enum, default_value = "json")]
        output: Output,
    },
    /// Re-derive state from a range of the events topic with the current logic (no actions).
    #[command(after_help = carhook_processor::tools::EXIT_CODES)]
    Replay {
        /// Start: an RFC 3339 time, or a partition:offset list such as 0:120,1:98.
        #[arg(long)]
        from: carhook_processor::replay::Bound,
        /// End (exclusive), same forms; default: the end of each partition at start.
        #[arg(long)]
        to: Option<carhook_processor::replay::Bound>,
        /// Only this vehicle's events.
        #[arg(long)]
        vehicle: Option<String>,
        /// Report what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Consumer group holding progress (default derived from the range, so re-running resumes).
        #[arg(long)]
        group: Option<String>,
        /// Stop after this many records; run the same command again to continue.
        #[arg(long)]
        max_records: Option<u64>,
        /// At most this many records per second, to leave the store room for live traffic
        /// (default: as fast as the store allows, `processor.concurrency` at a time).
        #[arg(long)]
        max_rate: Option<u32>,
        /// Afterwards, have the live processors record the corrected state of every vehicle the
        /// replay wrote in the state changelog (`kafka.state_topic`).
        #[arg(long, conflicts_with = "dry_run")]
        emit_changes: bool,
        /// The summary as `json` (default) or `table`.
        #[arg(long, value_enum, default_value = "json")]
        output: Output,
    },
    /// Inspect and redrive dead letters.
    #[command(after_help = carhook_processor::tools::EXIT_CODES)]
    Dlq {
        #[command(subcommand)]
        command: carhook_processor::tools::DlqCommand,
    },
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("processor: {msg}");
    ExitCode::from(code)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match Settings::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => return fail(e, 2),
    };
    match args.command.unwrap_or(Command::Run) {
        Command::Run => serve(settings).await,
        Command::Migrate => {
            let mut s = settings;
            s.telemetry.log_format = shared::config::LogFormat::Pretty;
            let _t = shared::telemetry::init_for_tool(&s.telemetry, "carhook-processor");
            match carhook_processor::migrate(&s).await {
                Ok(v) => {
                    println!("migrations applied: {v:?}; topics ensured");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, 1),
            }
        }
        Command::Replay {
            from,
            to,
            vehicle,
            dry_run,
            group,
            max_records,
            max_rate,
            emit_changes,
            output,
        } => {
            let mut s = settings;
            s.telemetry.log_format = shared::config::LogFormat::Pretty;
            let _t = shared::telemetry::init_for_tool(&s.telemetry, "carhook-processor");
            let req = carhook_processor::replay::ReplayRequest {
                from,
                to,
                vehicle,
                dry_run,
                group,
                max_records,
                max_rate,
                emit_changes,
            };
            carhook_processor::tools::replay(&s, &req, output).await
        }
        Command::Dlq { command } => {
            let mut s = settings;
            s.telemetry.log_format = shared::config::LogFormat::Pretty;
            let _t = shared::telemetry::init_for_tool(&s.telemetry, "carhook-processor");
            carhook_processor::tools::dlq(&s, command).await
        }
        Command::State {
            vehicle_id,
            last_event,
            output,
        } => carhook_processor::tools::state(&settings, &vehicle_id, last_event, output).await,
    }
}

async fn serve(settings: Settings) -> ExitCode {
    let telemetry = match shared::telemetry::init(&settings.telemetry, "carhook-processor") {
        Ok(t) => t,
        Err(e) => return fail(e, 2),
    };
    let admin = match shared::admin::bind(settings.processor.admin_listen, "processor.admin_listen")
        .await
    {
        Ok(l) => l,
        Err(e) => return fail(e, 1),
    };
    let shutdown = shared::shutdown::on_signal();
    let result = carhook_processor::run(settings, admin, shutdown).await;
    // Flushing exports over gRPC: keep it off the async worker threads.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}
