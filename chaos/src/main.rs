//! The chaos suite's driver: `cluster`, `chaos` (`--short` for CI, `--soak` by hand),
//! `servicebus` (the same suite on the Service Bus test broker) and the `worker` mode it
//! starts itself in. See `chaos/RESULTS.md` for what it does and its figures.

mod backend;
mod driver;
mod ledger;
mod plan;
mod worker;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A message's body: its number, from which its fate follows.
#[derive(Serialize, Deserialize)]
pub(crate) struct Job {
    pub(crate) n: u64,
}

fn parse(args: &[String]) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let Some(key) = arg.strip_prefix("--") else {
            return Err(format!("`{arg}`: options start with `--`"));
        };
        match key {
            "short" | "soak" => {
                map.insert(key.to_owned(), String::new());
            }
            _ => {
                let value = args
                    .next()
                    .ok_or_else(|| format!("`{arg}` needs a value"))?;
                map.insert(key.to_owned(), value.clone());
            }
        }
    }
    Ok(map)
}

const USAGE: &str = "usage: redeliver-chaos cluster [--messages N] | chaos [--short|--soak] \
                     [--messages N] | servicebus [--short|--soak] [--messages N]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let options = match parse(&args[1..]) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Service Bus processes run on one thread: `fe2o3-amqp` files a sent transfer as unsettled
    // only after writing it, and on a multi-threaded runtime a broker on loopback can answer
    // first, losing the outcome (see the Service Bus transport's "Known limits").
    let service_bus =
        mode == "servicebus" || options.get("transport").map(String::as_str) == Some("servicebus");
    let runtime = if service_bus {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    }
    .expect("a runtime");
    let result = match mode.as_str() {
        "worker" => {
            std::panic::set_hook(Box::new(|info| eprintln!("handler panicked: {info}")));
            worker::WorkerArgs::from_args(&options)
                .map(|args| runtime.block_on(worker::run(args)))
                .and_then(|r| r)
        }
        "cluster" | "chaos" | "servicebus" => driver::Settings::new(mode, &options)
            .map(|settings| runtime.block_on(driver::run(settings)))
            .and_then(|r| r),
        _ => Err(USAGE.to_owned()),
    };
    // Tasks still running (a failed run's fault injector, say) hold worker processes, which
    // are killed when dropped: drop them before exiting.
    drop(runtime);
    if let Err(e) = result {
        eprintln!("redeliver-chaos {mode}: {e}");
        std::process::exit(1);
    }
}
