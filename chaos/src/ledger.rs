//! The workers' durable record: one file per worker process, one line per event, each written
//! with a single `write` before the handler returns, so a line survives `kill -9` of the
//! process (the kernel has it) and a completion is recorded before it is acknowledged.
//!
//! `C <n> <attempt> <unix ms>`: message `n` completed. `S <n> <unix ms>`: a slow handler started.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends events to one worker's file.
pub(crate) struct Ledger(Mutex<File>);

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Ledger {
    pub(crate) fn open(path: &Path) -> std::io::Result<Ledger> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Ledger(Mutex::new(file)))
    }

    pub(crate) fn completed(&self, n: u64, attempt: u32) {
        self.write(&format!("C {n} {attempt} {}\n", now_ms()));
    }

    pub(crate) fn started_slow(&self, n: u64) {
        self.write(&format!("S {n} {}\n", now_ms()));
    }

    fn write(&self, line: &str) {
        let mut file = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // A record that cannot be written must not be acknowledged: fail the handler loudly.
        file.write_all(line.as_bytes())
            .expect("append to the worker's ledger");
    }
}

/// Everything the ledgers of a run say.
#[derive(Debug, Default)]
pub(crate) struct Reading {
    /// Completions per message.
    pub(crate) completions: BTreeMap<u64, u32>,
    /// Times of the completions, unix ms, in no order.
    pub(crate) completed_at: Vec<u64>,
    /// Slow handlers started, per file.
    pub(crate) slow_started: BTreeMap<String, u64>,
    /// Slow handlers completed, per file.
    pub(crate) slow_completed: BTreeMap<String, u64>,
    /// The slow messages each file saw start and not complete there: in flight in that
    /// process, or abandoned by it.
    pub(crate) slow_open: BTreeMap<String, BTreeSet<u64>>,
    /// The files that recorded a completion of each slow message.
    pub(crate) slow_completed_in: BTreeMap<u64, BTreeSet<String>>,
}

impl Reading {
    /// Reads every `*.ledger` file in `dir`; a last line cut by `kill -9` is ignored.
    pub(crate) fn of(dir: &Path) -> Reading {
        let mut reading = Reading::default();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return reading;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "ledger") {
                continue;
            }
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let mut started = BTreeSet::new();
            let mut done = BTreeSet::new();
            for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words[..] {
                    ["C", n, _attempt, at] => {
                        let (Ok(n), Ok(at)) = (n.parse::<u64>(), at.parse()) else {
                            continue;
                        };
                        *reading.completions.entry(n).or_default() += 1;
                        reading.completed_at.push(at);
                        if n >= crate::plan::SLOW_BASE {
                            *reading.slow_completed.entry(name.clone()).or_default() += 1;
                            done.insert(n);
                            reading
                                .slow_completed_in
                                .entry(n)
                                .or_default()
                                .insert(name.clone());
                        }
                    }
                    ["S", n, _] => {
                        *reading.slow_started.entry(name.clone()).or_default() += 1;
                        if let Ok(n) = n.parse::<u64>() {
                            started.insert(n);
                        }
                    }
                    _ => {}
                }
            }
            reading
                .slow_open
                .insert(name.clone(), started.difference(&done).copied().collect());
        }
        reading
    }
}
