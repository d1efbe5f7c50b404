//! The operator commands (`state`, `replay`, `dlq`, `poll now`, `poll resync`) as scripts use
//! them: the result — JSON, or a table with `--output table` — is the only thing on stdout; log
//! lines, progress and errors go to stderr; the exit code says what went wrong ([`Exit`], listed
//! in `--help` and the README).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::Value;
use shared::config::Settings;

use crate::dlq::{self, DlqError, LetterPos, Selection};
use crate::poll::PollError;
use crate::replay::{ReplayError, ReplayRequest};
use crate::state::StateError;
use crate::store::{Store, StoreError};

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure (the command could not do what was asked, e.g. an incomplete read of the dead-letter topic,
     a poll that failed or was not applied in time)
  2  bad configuration or usage (invalid option, unknown --reason, --all without --yes when not interactive)
  3  not found (unknown vehicle, no dead letter at that position, no such topic; a vehicle Smartcar
     answers 404 for or whose user id is unknown)
  4  store or broker unreachable";

/// Why an operator command stopped; the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Failure = 1,
    Usage = 2,
    NotFound = 3,
    Unreachable = 4,
}

/// Writes `msg` to stderr and returns `code` as the process exit code.
pub fn fail(msg: impl std::fmt::Display, code: Exit) -> ExitCode {
    eprintln!("processor: {msg}");
    ExitCode::from(code as u8)
}

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Json,
    Table,
}

/// A table with `header`, in the style every command uses.
pub fn table<const N: usize>(header: [&str; N]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_HORIZONTAL_ONLY)
        .set_header(header.to_vec());
    t
}

/// A JSON object as a two-column table (nested values as compact JSON).
fn fields_table(v: &Value) -> comfy_table::Table {
    let mut t = table(["FIELD", "VALUE"]);
    if let Some(o) = v.as_object() {
        for (k, v) in o {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            t.add_row(vec![k.clone(), text]);
        }
    }
    t
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn store_exit(e: &StoreError) -> Exit {
    if e.is_transient() {
        Exit::Unreachable
    } else {
        Exit::Failure
    }
}

fn dlq_exit(e: &DlqError) -> Exit {
    match e {
        DlqError::Kafka(_) | DlqError::Cql(_) => Exit::Unreachable,
        DlqError::NotFound(_) => Exit::NotFound,
        DlqError::BadPosition(_) | DlqError::BadReason { .. } => Exit::Usage,
        DlqError::Incomplete(_) => Exit::Failure,
    }
}

async fn connect(settings: &Settings) -> Result<scylla::client::session::Session, ExitCode> {
    shared::cql::connect(&settings.cql)
        .await
        .map_err(|e| fail(e, Exit::Unreachable))
}

/// `processor state <vehicle>`.
pub async fn state(
    settings: &Settings,
    vehicle: &str,
    last_event: bool,
    output: Output,
) -> ExitCode {
    let session = match connect(settings).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let ks = &settings.cql.keyspace;
    let state = if last_event {
        crate::state::vehicle_state_with_last_event(&session, ks, vehicle).await
    } else {
        crate::state::vehicle_state(&session, ks, vehicle).await
    };
    match state {
        Ok(v) => {
            match output {
                Output::Json => print_json(&v),
                Output::Table => println!("{}", state_table(&v)),
            }
            ExitCode::SUCCESS
        }
        Err(e @ StateError::UnknownVehicle(_)) => fail(e, Exit::NotFound),
        Err(e @ StateError::Store { .. }) => fail(e, Exit::Unreachable),
    }
}

/// A vehicle's state as a table: one row per signal, then the vehicle-wide fields.
fn state_table(v: &Value) -> String {
    let mut signals = table(["SIGNAL", "STATUS", "VALUE", "OEM UPDATED AT", "EVENT ID"]);
    if let Some(o) = v["signals"].as_object() {
        for (code, s) in o {
            let text = |k: &str| match &s[k] {
                Value::String(x) => x.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            signals.add_row(vec![
                code.clone(),
                text("status"),
                text("body"),
                text("oemUpdatedAt"),
                text("eventId"),
            ]);
        }
    }
    let mut rest = v.clone();
    if let Some(o) = rest.as_object_mut() {
        o.remove("signals");
    }
    format!("{signals}\n{}", fields_table(&rest))
}

fn poll_exit(e: &PollError) -> Exit {
    match e {
        PollError::Config(_) | PollError::Vehicle(..) => Exit::Usage,
        PollError::Cql(shared::cql::CqlError::Connect { .. })
        | PollError::Kafka(_)
        | PollError::Topics(_)
        | PollError::Produce(_) => Exit::Unreachable,
        PollError::Store(e) => store_exit(e),
        PollError::NotPolled {
            result: "skipped_no_user",
            ..
        }
        | PollError::PollFailed {
            result: "not_found",
            ..
        } => Exit::NotFound,
        PollError::Cql(_)
        | PollError::Api(_)
        | PollError::NotPolled { .. }
        | PollError::PollFailed { .. } => Exit::Failure,
    }
}

/// `processor poll now <vehicle>`: the report on stdout; exit 1 when the polled event was not
/// applied within `wait` (the report still says where it was produced).
pub async fn poll_now(
    settings: &Settings,
    vehicle: &str,
    user_id: Option<String>,
    wait: std::time::Duration,
    output: Output,
) -> ExitCode {
    let report = match crate::poll::poll_now(settings, vehicle, user_id, wait).await {
        Ok(r) => r,
        Err(e) => return fail(&e, poll_exit(&e)),
    };
    match output {
        Output::Json => print_json(&report),
        Output::Table => println!("{}", poll_table(&report)),
    }
    if report["applied"] == Value::Bool(true) {
        ExitCode::SUCCESS
    } else {
        fail(
            format!(
                "vehicle {vehicle}: the polled event {} was produced to the events topic at {} but no processor applied it within {} s (is `processor run` up? it is applied once one runs)",
                report["eventId"].as_str().unwrap_or("?"),
                report["eventsTopicPosition"].as_str().unwrap_or("?"),
                wait.as_secs()
            ),
            Exit::Failure,
        )
    }
}

/// A `poll now` report as a table: one row per signal fetched, then the other fields.
fn poll_table(v: &Value) -> String {
    let mut signals = table([
        "SIGNAL",
        "STATUS",
        "VALUE",
        "OEM UPDATED AT",
        "STORED SOURCE",
    ]);
    for s in v["signals"].as_array().into_iter().flatten() {
        let text = |x: &Value| match x {
            Value::String(t) => t.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        };
        signals.add_row(vec![
            text(&s["code"]),
            text(&s["status"]),
            text(&s["body"]),
            text(&s["oemUpdatedAt"]),
            text(&s["storedSource"]),
        ]);
    }
    let mut rest = v.clone();
    if let Some(o) = rest.as_object_mut() {
        o.remove("signals");
    }
    format!("{signals}\n{}", fields_table(&rest))
}

/// `processor poll resync --since`: how many requests were made, on stdout.
pub async fn poll_resync(
    settings: &Settings,
    since: shared::clock::EpochMillis,
    output: Output,
) -> ExitCode {
    match crate::poll::resync(settings, since).await {
        Ok(n) => {
            let v = serde_json::json!({ "requested": n, "since": since.to_rfc3339() });
            match output {
                Output::Json => print_json(&v),
                Output::Table => println!("{}", fields_table(&v)),
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, poll_exit(&e)),
    }
}

/// `processor replay`: its summary on stdout.
pub async fn replay(settings: &Settings, req: &ReplayRequest, output: Output) -> ExitCode {
    let session = match connect(settings).await {
        Ok(x) => std::sync::Arc::new(x),
        Err(code) => return code,
    };
    let store =
        match Store::prepare(session, &settings.cql.keyspace, settings.cql.dedup_ttl_days).await {
            Ok(x) => x,
            Err(e) => return fail(&e, store_exit(&e)),
        };
    match crate::replay::replay(settings, &store, req, shared::shutdown::on_signal()).await {
        Ok(sum) => {
            match output {
                Output::Json => print_json(&sum),
                Output::Table => println!(
                    "{}",
                    fields_table(&serde_json::to_value(&sum).unwrap_or_default())
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e @ ReplayError::Kafka(_)) => fail(e, Exit::Unreachable),
        Err(e @ ReplayError::NoTopic(_)) => fail(e, Exit::NotFound),
        Err(ReplayError::Store(e)) => fail(&e, store_exit(&e)),
        // The replay's writes are done; only the refresh requests were not acknowledged.
        Err(e @ ReplayError::Refresh { .. }) => fail(e, Exit::Unreachable),
    }
}

/// `processor dlq …`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Dead letters in position order, read as they stream in; completeness is reported on stderr
    /// (and in the JSON), and a read that could not reach the end of every partition exits 1.
    List {
        /// Only letters with this error class (one of the known classes, e.g. not_json).
        #[arg(long, value_parser = dlq::parse_reason)]
        reason: Option<String>,
        /// Stop reading once this many letters matched.
        #[arg(long)]
        limit: Option<usize>,
        /// `table` (default) or `json`.
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        /// Same as `--output json`.
        #[arg(long, conflicts_with = "output")]
        json: bool,
    },
    /// One letter with its headers and body, read directly at its position; POSITION is
    /// partition:offset (or an offset on partition 0).
    Show {
        position: LetterPos,
        /// `json` (default) or `table`.
        #[arg(long, value_enum, default_value = "json")]
        output: Output,
    },
    /// Re-publish letters to the events topic. Acts only on a complete read of the topic.
    Redrive {
        /// Every letter (asks for confirmation on a terminal; needs --yes otherwise).
        #[arg(long, conflicts_with_all = ["offset", "reason"])]
        all: bool,
        /// These positions (partition:offset), comma-separated.
        #[arg(long, value_delimiter = ',')]
        offset: Vec<LetterPos>,
        /// Letters with this error class (one of the known classes).
        #[arg(long, value_parser = dlq::parse_reason)]
        reason: Option<String>,
        /// Show what would be redriven.
        #[arg(long)]
        dry_run: bool,
        /// Loop guard: refuse letters already redriven this many times.
        #[arg(long, default_value_t = 3)]
        max_redrives: u32,
        /// Redrive --all without asking.
        #[arg(long)]
        yes: bool,
        /// `json` (default) or `table`.
        #[arg(long, value_enum, default_value = "json")]
        output: Output,
    },
}

/// Runs a `dlq` subcommand.
pub async fn dlq(settings: &Settings, command: DlqCommand) -> ExitCode {
    match command {
        DlqCommand::List {
            reason,
            limit,
            output,
            json,
        } => list(
            settings,
            reason,
            limit,
            if json { Output::Json } else { output },
        ),
        DlqCommand::Show { position, output } => match dlq::fetch(settings, position) {
            Ok(l) => {
                let v = l.to_json(true);
                match output {
                    Output::Json => print_json(&v),
                    Output::Table => println!("{}", fields_table(&v)),
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e, dlq_exit(&e)),
        },
        DlqCommand::Redrive {
            all,
            offset,
            reason,
            dry_run,
            max_redrives,
            yes,
            output,
        } => {
            let selection = match (all, offset.is_empty(), reason) {
                (true, _, _) => Selection::All,
                (false, false, _) => Selection::Positions(offset),
                (false, true, Some(r)) => Selection::Reason(r),
                (false, true, None) => {
                    return fail("redrive needs --all, --offset or --reason", Exit::Usage)
                }
            };
            if all && !yes && !dry_run && !std::io::stdin().is_terminal() {
                return fail(
                    "redrive --all re-publishes every dead letter: pass --yes to confirm when not running interactively",
                    Exit::Usage,
                );
            }
            let session = match connect(settings).await {
                Ok(x) => x,
                Err(code) => return code,
            };
            let (letters, coverage) = match dlq::select(settings, &selection) {
                Ok(x) => x,
                Err(e) => return fail(&e, dlq_exit(&e)),
            };
            if all && !yes && !dry_run && !confirm(letters.len()) {
                return fail(
                    "redrive --all not confirmed; nothing redriven",
                    Exit::Failure,
                );
            }
            match dlq::redrive_letters(
                settings,
                &session,
                &letters,
                coverage,
                dry_run,
                max_redrives,
            )
            .await
            {
                Ok(sum) => {
                    match output {
                        Output::Json => print_json(&sum),
                        Output::Table => println!(
                            "{}",
                            fields_table(&serde_json::to_value(&sum).unwrap_or_default())
                        ),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e, dlq_exit(&e)),
            }
        }
    }
}

/// Asks on the terminal whether to redrive `n` letters; only `y`/`yes` confirms.
fn confirm(n: usize) -> bool {
    eprint!("Redrive all {n} dead letter(s) to the events topic? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// `dlq list`: matching letters collected until `limit`, then printed; the coverage goes to
/// stderr (and into the JSON document).
fn list(
    settings: &Settings,
    reason: Option<String>,
    limit: Option<usize>,
    output: Output,
) -> ExitCode {
    let limit = limit.unwrap_or(usize::MAX);
    let mut shown = Vec::new();
    let scanned = dlq::scan(settings, |l| {
        if reason.as_deref().is_some_and(|r| l.reason() != r) {
            return true;
        }
        shown.push(l);
        shown.len() < limit
    });
    let cov = match scanned {
        Ok(c) => c,
        Err(e) => return fail(&e, dlq_exit(&e)),
    };
    match output {
        Output::Json => print_json(&serde_json::json!({
            "letters": shown.iter().map(|l| l.to_json(false)).collect::<Vec<_>>(),
            "coverage": cov,
        })),
        Output::Table => println!("{}", dlq::table(&shown)),
    }
    eprintln!("processor: {} shown; {cov}", shown.len());
    if cov.complete || cov.limit_reached {
        ExitCode::SUCCESS
    } else {
        fail(DlqError::Incomplete(cov), Exit::Failure)
    }
}
