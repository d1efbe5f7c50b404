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
        Command::State { vehicle_id } => {
            let session = match shared::cql::connect(&settings.cql).await {
                Ok(s) => s,
                Err(e) => return fail(e, 1),
            };
            match carhook_processor::state::vehicle_state(
                &session,
                &settings.cql.keyspace,
                &vehicle_id,
            )
            .await
            {
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
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}
