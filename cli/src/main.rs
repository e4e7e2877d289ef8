//! `redeliver`: inspect, group, replay and purge an endpoint's dead letters on any transport
//! redeliver connects to (`amqp://...`, a Service Bus connection string).
//!
//! ```text
//! redeliver dead-letters list    ENDPOINT [--max N]
//! redeliver dead-letters show    ENDPOINT ID
//! redeliver dead-letters group   ENDPOINT
//! redeliver dead-letters replay  ENDPOINT [selection] [--to ENDPOINT] [--keep-attempt]
//!                                         [--rate PER_SECOND] [--dry-run] [--yes]
//! redeliver dead-letters purge   ENDPOINT [selection] [--dry-run] [--yes]
//!
//! selection: --id ID (repeatable), --fingerprint ID (from `group`), --older-than 2h
//! ```
//!
//! The transport URL comes from `--url` or `REDELIVER_URL`; `--json` prints one JSON document
//! for scripts. A replay or purge of *every* dead letter needs `--yes` (or a selection).
//!
//! # Exit codes
//! - `0`: done.
//! - `1`: the operation failed (the broker could not be reached, refused, timed out...).
//! - `2`: the command line is wrong (clap's usage error).
//! - `3`: refused: a replay or purge of everything without `--yes`.
//! - `4`: `show` found no dead letter with that id.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use redeliver::dead_letters::{DeadLetters, Group, Progress, ReplayOptions, Report, Selection};
use redeliver::{Error, Message, Transport};
use serde_json::{Value, json};

/// The header naming a message's type (`redeliver_core::message::MESSAGE_TYPE`).
const MESSAGE_TYPE: &str = "message-type";

const REFUSED: u8 = 3;
const NOT_FOUND: u8 = 4;

/// Inspect, group, replay and purge dead letters.
#[derive(Parser)]
#[command(name = "redeliver", version, about)]
struct Cli {
    /// The transport URL: `amqp://user:password@host:5672/%2f` or a Service Bus connection
    /// string.
    #[arg(long, env = "REDELIVER_URL", hide_env_values = true, global = true)]
    url: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// An endpoint's dead letters.
    #[command(name = "dead-letters", subcommand)]
    DeadLetters(DeadLetterCommand),
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Lists dead letters, oldest first, leaving them in place.
    List {
        /// The endpoint.
        endpoint: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Shows one dead letter with its headers and body.
    Show {
        /// The endpoint.
        endpoint: String,
        /// The message id.
        id: String,
    },
    /// Groups dead letters by reason, message type and endpoint.
    Group {
        /// The endpoint.
        endpoint: String,
    },
    /// Sends dead letters back to their endpoint (or another), each confirmed before its dead
    /// letter is removed.
    Replay {
        /// The endpoint.
        endpoint: String,
        #[command(flatten)]
        selection: SelectionArgs,
        /// Send them to this endpoint instead.
        #[arg(long)]
        to: Option<String>,
        /// Keep each message's attempt instead of starting again at 1.
        #[arg(long)]
        keep_attempt: bool,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Removes dead letters.
    Purge {
        /// The endpoint.
        endpoint: String,
        #[command(flatten)]
        selection: SelectionArgs,
    },
}

#[derive(Args)]
struct SelectionArgs {
    /// Only the dead letter with this id (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Only the group with this fingerprint (the `id` that `group` prints).
    #[arg(long)]
    fingerprint: Option<String>,
    /// Only dead letters whose last failure is at least this old (`30m`, `2h`, `1day`).
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Only report what would be done.
    #[arg(long)]
    dry_run: bool,
    /// Confirms an operation on every dead letter (no selection).
    #[arg(long)]
    yes: bool,
}

impl SelectionArgs {
    fn selection(&self) -> Selection {
        let mut selection = Selection::all();
        if !self.ids.is_empty() {
            selection = selection.ids(self.ids.iter().map(String::as_str));
        }
        if let Some(fingerprint) = &self.fingerprint {
            selection = selection.fingerprint(fingerprint.clone());
        }
        if let Some(age) = self.older_than {
            selection = selection.older_than(age);
        }
        selection
    }

    /// Whether the operation may go ahead: a selection, a dry run or `--yes`.
    fn allowed(&self) -> bool {
        self.yes || self.dry_run || !self.selection().is_all()
    }
}

// One operation at a time: a current-thread runtime is enough, and it keeps the Service Bus
// client clear of its multi-threaded outcome race (see the Service Bus transport's docs).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("redeliver: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    let Command::DeadLetters(command) = cli.command;
    if let DeadLetterCommand::Replay { selection, .. } | DeadLetterCommand::Purge { selection, .. } =
        &command
        && !selection.allowed()
    {
        eprintln!(
            "redeliver: refusing to act on every dead letter; give a selection (--id, \
             --fingerprint, --older-than), --dry-run, or --yes"
        );
        return Ok(ExitCode::from(REFUSED));
    }
    let url = cli.url.ok_or_else(|| {
        Error::config(
            "--url",
            "give the transport URL with --url or the REDELIVER_URL environment variable",
        )
    })?;
    let transport: Arc<dyn Transport> = redeliver::connect(&url).await?;
    let result = operate(command, cli.json, Arc::clone(&transport)).await;
    // Gives back what the operation's consumers still hold, so that nothing stays locked
    // after the process ends.
    transport.close().await;
    result
}

async fn operate(
    command: DeadLetterCommand,
    json: bool,
    transport: Arc<dyn Transport>,
) -> Result<ExitCode, Error> {
    match command {
        DeadLetterCommand::List { endpoint, max } => {
            let dead = DeadLetters::new(transport, &endpoint);
            let messages = dead.list(max).await?;
            if json {
                let all: Vec<Value> = messages.iter().map(|m| view(m, false)).collect();
                println!("{}", json!({ "endpoint": endpoint, "dead_letters": all }));
            } else {
                for m in &messages {
                    println!("{}", line(m));
                }
                println!("{} dead letter(s) of `{endpoint}`", messages.len());
            }
        }
        DeadLetterCommand::Show { endpoint, id } => {
            let dead = DeadLetters::new(transport, &endpoint);
            let Some(message) = dead.show(&id.as_str().into()).await? else {
                eprintln!("redeliver: `{endpoint}` has no dead letter with id `{id}`");
                return Ok(ExitCode::from(NOT_FOUND));
            };
            let shown = view(&message, true);
            if json {
                println!("{shown}");
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&shown).unwrap_or_default()
                );
            }
        }
        DeadLetterCommand::Group { endpoint } => {
            let dead = DeadLetters::new(transport, &endpoint);
            let groups = dead.group().await?;
            if json {
                println!("{}", json!({ "endpoint": endpoint, "groups": groups }));
            } else {
                for g in &groups {
                    println!("{}", group_line(g));
                }
            }
        }
        DeadLetterCommand::Replay {
            endpoint,
            selection,
            to,
            keep_attempt,
            rate,
        } => {
            let dead = DeadLetters::new(transport, &endpoint);
            let mut options = ReplayOptions::default()
                .with_keep_attempt(keep_attempt)
                .with_dry_run(selection.dry_run);
            if let Some(to) = to {
                options = options.with_target(to);
            }
            if let Some(rate) = rate {
                options = options.with_rate_limit(rate);
            }
            let bar = bar(json);
            let report = dead
                .replay(&selection.selection(), &options, &mut |p| advance(&bar, p))
                .await;
            bar.finish_and_clear();
            print_report(&report?, "replayed", json);
        }
        DeadLetterCommand::Purge {
            endpoint,
            selection,
        } => {
            let dead = DeadLetters::new(transport, &endpoint);
            let bar = bar(json);
            let report = dead
                .purge(&selection.selection(), selection.dry_run, &mut |p| {
                    advance(&bar, p)
                })
                .await;
            bar.finish_and_clear();
            print_report(&report?, "purged", json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on standard error, hidden with `--json` (scripts read standard output).
fn bar(json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} {eta}") {
        bar.set_style(style);
    }
    bar
}

fn advance(bar: &ProgressBar, progress: Progress) {
    bar.set_length(progress.total);
    bar.set_position(progress.done);
}

fn print_report(report: &Report, done: &str, json: bool) {
    if json {
        println!("{}", json!(report));
    } else if report.dry_run {
        println!(
            "dry run: {} of {} dead letter(s) would be {done}",
            report.selected, report.seen
        );
        for id in &report.ids {
            println!("  {id}");
        }
    } else {
        println!(
            "{} of {} dead letter(s) {done} ({} selected)",
            report.done, report.seen, report.selected
        );
    }
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".to_owned())
}

fn line(m: &Message) -> String {
    let reason = m.dead_letter().map(|d| d.reason.as_str()).unwrap_or("-");
    format!(
        "{}  attempt {}  {}  `{}`  {}",
        m.id(),
        m.attempt(),
        time(m.last_failed_at()),
        reason,
        m.headers().get(MESSAGE_TYPE).unwrap_or("-"),
    )
}

fn group_line(g: &Group) -> String {
    format!(
        "{}  {:>6}  {}  since {}  last {}",
        g.id,
        g.count,
        g.fingerprint,
        time(g.first_failed_at),
        time(g.last_failed_at)
    )
}

/// A dead letter as JSON; with `whole`, its headers and body too (the body as text if it is
/// UTF-8, else hexadecimal).
fn view(m: &Message, whole: bool) -> Value {
    let dead = m.dead_letter();
    let mut value = json!({
        "id": m.id().as_str(),
        "reason": dead.map(|d| d.reason.as_str()),
        "description": dead.and_then(|d| d.description.as_deref()),
        "attempt": m.attempt(),
        "message_type": m.headers().get(MESSAGE_TYPE),
        "first_failed_at": m.first_failed_at(),
        "last_failed_at": m.last_failed_at(),
        "replay_count": m.replay_count(),
        "replayed_at": m.replayed_at(),
    });
    if whole {
        let headers: serde_json::Map<String, Value> = m
            .headers()
            .iter()
            .map(|(k, v)| (k.to_owned(), Value::from(v)))
            .collect();
        value["headers"] = Value::Object(headers);
        value["content_type"] = json!(m.content_type());
        value["body"] = match std::str::from_utf8(m.body()) {
            Ok(text) => Value::from(text),
            Err(_) => Value::from(
                m.body()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            ),
        };
    }
    value
}
