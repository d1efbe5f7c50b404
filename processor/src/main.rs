//! `processor`: the consumer service and the operator subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use carhook_processor::tools::Output;
use clap::{Parser, Subcommand};
use shared::config::Settings;

/// Turns Smartcar events into vehicle state; operator tools for state, migrations.
/// mimalloc instead of the system allocator: per event the processor parses, builds and drops
/// many small JSON trees, and glibc's malloc spent about 45 % of the processor's CPU on them
/// (`perf` on the changelog drain, `bench/latest.md`), most of it consolidating freed chunks.
/// `main` has it return freed memory within 100 ms (see `carhook_alloc`).
#[global_allocator]
static GLOBAL: carhook_alloc::MiMalloc = carhook_alloc::MiMalloc;

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
    /// The REST polling fallback: the poller service and its operator commands.
    Poll {
        #[command(subcommand)]
        command: PollCommand,
    },
}

#[derive(Subcommand)]
enum PollCommand {
    /// Consume poll requests under the budgets (the poller service).
    Run,
    /// Poll one vehicle now and print what was fetched and applied; exit 1 when it failed or the
    /// processor did not apply it within --wait-secs, 3 for a vehicle Smartcar or carhook does
    /// not know. It uses its own budget, outside the running poller's global bucket.
    #[command(after_help = carhook_processor::tools::EXIT_CODES)]
    Now {
        /// The vehicle id.
        vehicle_id: String,
        /// The Smartcar user id (`sc-user-id`); default: the one kept from the vehicle's webhooks.
        #[arg(long)]
        user_id: Option<String>,
        /// How long to wait for the processor to apply the polled event.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
        /// `json` (default) or `table`.
        #[arg(long, value_enum, default_value = "json")]
        output: Output,
    },
    /// Request a poll for every vehicle with a webhook delivered since a time.
    #[command(after_help = carhook_processor::tools::EXIT_CODES)]
    Resync {
        /// RFC 3339 time, e.g. 2026-11-29T10:00:00Z.
        #[arg(long, value_parser = parse_time)]
        since: shared::clock::EpochMillis,
        /// `json` (default) or `table`.
        #[arg(long, value_enum, default_value = "json")]
        output: Output,
    },
}

fn parse_time(s: &str) -> Result<shared::clock::EpochMillis, String> {
    shared::clock::EpochMillis::parse_str(s)
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 time (e.g. 2026-11-29T10:00:00Z)"))
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("processor: {msg}");
    ExitCode::from(code)
}

#[tokio::main]
async fn main() -> ExitCode {
    carhook_alloc::return_freed_memory_promptly();
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
        Command::Poll { command } => poll(settings, command).await,
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

async fn poll(settings: Settings, command: PollCommand) -> ExitCode {
    use carhook_processor::poll;
    match command {
        PollCommand::Run => {
            let telemetry = match shared::telemetry::init(&settings.telemetry, "carhook-poller") {
                Ok(t) => t,
                Err(e) => return fail(e, 2),
            };
            if let Err(e) = shared::config::Settings::client_credentials_check(&settings) {
                return fail(e, 2);
            }
            let admin = match shared::admin::bind(
                settings.poller.admin_listen,
                "poller.admin_listen",
            )
            .await
            {
                Ok(l) => l,
                Err(e) => return fail(e, 1),
            };
            let result = poll::run(settings, admin, shared::shutdown::on_signal()).await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e, 1),
            }
        }
        PollCommand::Now {
            vehicle_id,
            user_id,
            wait_secs,
            output,
        } => {
            let mut s = settings;
            s.telemetry.log_format = shared::config::LogFormat::Pretty;
            let _t = shared::telemetry::init_for_tool(&s.telemetry, "carhook-poller");
            carhook_processor::tools::poll_now(
                &s,
                &vehicle_id,
                user_id,
                std::time::Duration::from_secs(wait_secs),
                output,
            )
            .await
        }
        PollCommand::Resync { since, output } => {
            let mut s = settings;
            s.telemetry.log_format = shared::config::LogFormat::Pretty;
            let _t = shared::telemetry::init_for_tool(&s.telemetry, "carhook-poller");
            carhook_processor::tools::poll_resync(&s, since, output).await
        }
    }
}
