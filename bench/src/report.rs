//! The table and the JSON file.

use serde::Serialize;

use crate::Scale;

/// One figure, possibly next to the raw client's.
#[derive(Debug, Serialize)]
pub(crate) struct Figure {
    pub(crate) group: &'static str,
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: &'static str,
    /// The raw client's figure measured in the same run, if any.
    pub(crate) raw: Option<f64>,
    /// `value / raw`.
    pub(crate) ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    runs_per_figure: usize,
    machine: String,
    figures: Vec<Figure>,
}

impl Report {
    pub(crate) fn new(scale: &Scale) -> Self {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        Report {
            runs_per_figure: scale.runs,
            machine: format!("{} cores, {}", cores, std::env::consts::ARCH),
            figures: Vec::new(),
        }
    }

    pub(crate) fn add(
        &mut self,
        group: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) {
        self.figures.push(Figure {
            group,
            name: name.into(),
            value,
            unit,
            raw: None,
            ratio: None,
        });
    }

    pub(crate) fn compare(
        &mut self,
        group: &'static str,
        name: impl Into<String>,
        value: f64,
        raw: f64,
        unit: &'static str,
    ) {
        self.figures.push(Figure {
            group,
            name: name.into(),
            value,
            unit,
            raw: Some(raw),
            ratio: (raw > 0.0).then(|| value / raw),
        });
    }

    pub(crate) fn print(&self) {
        println!(
            "\nredeliver-bench: median of {} run(s) per figure, {}\n",
            self.runs_per_figure, self.machine
        );
        println!(
            "{:<10} {:<66} {:>12} {:<6} {:>12} {:>6}",
            "group", "figure", "redeliver", "unit", "raw client", "ratio"
        );
        for f in &self.figures {
            let raw = f.raw.map_or(String::new(), |r| format!("{r:.1}"));
            let ratio = f.ratio.map_or(String::new(), |r| format!("{r:.2}"));
            println!(
                "{:<10} {:<66} {:>12.1} {:<6} {:>12} {:>6}",
                f.group, f.name, f.value, f.unit, raw, ratio
            );
        }
    }

    pub(crate) fn write_json(&self, path: &str) {
        let json = serde_json::to_string_pretty(self).expect("figures serialize");
        std::fs::write(path, json).unwrap_or_else(|e| panic!("could not write {path}: {e}"));
    }
}
