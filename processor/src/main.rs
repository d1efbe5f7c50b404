//! `processor`: the consumer service and the operator subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shared::config::Settings;

/// Turns Smartcar events into vehicle state; operator tools for state, migrations.
#[derive(Parser)]
#[command(version, about)]
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
    /// Print a vehicle's current state as JSON.
    State {
        /// The vehicle id.
        vehicle_id: String,
        /// Also print `lastEvent`: the last event applied (bookkeeping, not part of the document).
        #[arg(long)]
        last_event: bool,
    },
    /// Re-derive state from a range of the events topic with the current logic (no actions).
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
    },
    /// Inspect and redrive dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
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
    /// Poll one vehicle now and print what was fetched and applied (exit 1 when not polled).
    Now {
        /// The vehicle id.
        vehicle_id: String,
        /// The Smartcar user id (`sc-user-id`); default: the one kept from the vehicle's webhooks.
        #[arg(long)]
        user_id: Option<String>,
        /// How long to wait for the processor to apply the polled event.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
    },
    /// Request a poll for every vehicle with an event delivered since a time.
    Resync {
        /// RFC 3339 time, e.g. 2026-11-29T10:00:00Z.
        #[arg(long, value_parser = parse_time)]
        since: shared::clock::EpochMillis,
    },
}

fn parse_time(s: &str) -> Result<shared::clock::EpochMillis, String> {
    shared::clock::EpochMillis::parse_str(s)
        .ok_or_else(|| format!("{s:?} is not an RFC 3339 time (e.g. 2026-11-29T10:00:00Z)"))
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Table of dead letters.
    List {
        /// Only letters with this error class (e.g. not_json, missing_field).
        #[arg(long)]
        reason: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One letter with its headers and body; POSITION is partition:offset (or an offset on partition 0).
    Show {
        position: carhook_processor::dlq::LetterPos,
    },
    /// Re-publish letters to the events topic.
    Redrive {
        /// Every letter.
        #[arg(long, conflicts_with_all = ["offset", "reason"])]
        all: bool,
        /// These positions (partition:offset), comma-separated.
        #[arg(long, value_delimiter = ',')]
        offset: Vec<carhook_processor::dlq::LetterPos>,
        /// Letters with this error class.
        #[arg(long)]
        reason: Option<String>,
        /// Show what would be redriven.
        #[arg(long)]
        dry_run: bool,
        /// Loop guard: refuse letters already redriven this many times.
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
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
            let _t = shared::telemetry::init(&s.telemetry, "carhook-processor");
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
        } => {
            let mut s = settings;
            s.telemetry.log_format = shared::config::LogFormat::Pretty;
            let _t = shared::telemetry::init(&s.telemetry, "carhook-processor");
            let session = match shared::cql::connect(&s.cql).await {
                Ok(x) => std::sync::Arc::new(x),
                Err(e) => return fail(e, 1),
            };
            let store = match carhook_processor::store::Store::prepare(
                session,
                &s.cql.keyspace,
                s.cql.dedup_ttl_days,
            )
            .await
            {
                Ok(x) => x,
                Err(e) => return fail(e, 1),
            };
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
            match carhook_processor::replay::replay(&s, &store, &req, shared::shutdown::on_signal())
                .await
            {
                Ok(sum) => {
                    println!("{}", serde_json::to_string_pretty(&sum).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, 1),
            }
        }
        Command::Dlq { command } => dlq(settings, command).await,
        Command::Poll { command } => poll(settings, command).await,
        Command::State {
            vehicle_id,
            last_event,
        } => {
            let session = match shared::cql::connect(&settings.cql).await {
                Ok(s) => s,
                Err(e) => return fail(e, 1),
            };
            let state = if last_event {
                carhook_processor::state::vehicle_state_with_last_event(
                    &session,
                    &settings.cql.keyspace,
                    &vehicle_id,
                )
                .await
            } else {
                carhook_processor::state::vehicle_state(
                    &session,
                    &settings.cql.keyspace,
                    &vehicle_id,
                )
                .await
            };
            match state {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, 1),
            }
        }
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
        } => {
            let mut s = settings;
            s.telemetry.log_format = shared::config::LogFormat::Pretty;
            s.telemetry.log_level = "warn".into();
            let _t = shared::telemetry::init(&s.telemetry, "carhook-poller");
            match poll::poll_now(
                &s,
                &vehicle_id,
                user_id,
                std::time::Duration::from_secs(wait_secs),
            )
            .await
            {
                Ok(report) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, 1),
            }
        }
        PollCommand::Resync { since } => match poll::resync(&settings, since).await {
            Ok(n) => {
                println!(
                    "{{\"requested\": {n}, \"since\": \"{}\"}}",
                    since.to_rfc3339()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
    }
}

async fn dlq(settings: Settings, command: DlqCommand) -> ExitCode {
    use carhook_processor::dlq;
    match command {
        DlqCommand::List {
            reason,
            limit,
            json,
        } => match dlq::read_letters(&settings) {
            Ok(letters) => {
                let shown: Vec<_> = letters
                    .into_iter()
                    .filter(|l| reason.as_deref().is_none_or(|r| l.reason() == r))
                    .take(limit.unwrap_or(usize::MAX))
                    .collect();
                dlq::print_list(&shown, json);
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
        DlqCommand::Show { position } => match dlq::read_letters(&settings) {
            Ok(letters) => match letters.iter().find(|l| l.pos == position) {
                Some(l) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&l.to_json(true)).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                None => fail(dlq::DlqError::NotFound(position.to_string()), 1),
            },
            Err(e) => fail(e, 1),
        },
        DlqCommand::Redrive {
            all,
            offset,
            reason,
            dry_run,
            max_redrives,
        } => {
            let selection = match (all, offset.is_empty(), reason) {
                (true, _, _) => dlq::Selection::All,
                (false, false, _) => dlq::Selection::Positions(offset),
                (false, true, Some(r)) => dlq::Selection::Reason(r),
                (false, true, None) => return fail("redrive needs --all, --offset or --reason", 2),
            };
            let session = match shared::cql::connect(&settings.cql).await {
                Ok(x) => x,
                Err(e) => return fail(e, 1),
            };
            match dlq::redrive(&settings, &session, &selection, dry_run, max_redrives).await {
                Ok(sum) => {
                    println!("{}", serde_json::to_string_pretty(&sum).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, 1),
            }
        }
    }
}
