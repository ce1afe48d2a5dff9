//! Results: per-round measurements, medians over rounds, the table for
//! people, JSON lines for machines, and the ratio table.
//!
//! Plain data and formatting only; nothing here runs or measures anything.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::scenario::Scenario;
use crate::stats::median;
use crate::systems::CANONICAL_ORDER;

/// The figures of one scenario for one system in one round; only the
/// fields that apply to the scenario are set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measurement {
    /// Median latency in microseconds.
    pub p50_us: Option<f64>,
    /// 99th percentile latency in microseconds.
    pub p99_us: Option<f64>,
    /// Operations per second (calls, messages or connections).
    pub per_sec: Option<f64>,
    /// Daemon CPU time per routed message in microseconds.
    pub cpu_us_per_msg: Option<f64>,
    /// Daemon RSS per idle connection in KiB.
    pub rss_kib: Option<f64>,
}

/// Table headings of the metrics, in column order (the order of
/// [`Measurement::get`]).
pub const METRICS: [&str; 5] = ["p50_us", "p99_us", "per_sec", "cpu_us/msg", "rss_kib/conn"];

impl Measurement {
    /// The value of metric number `i` of [`METRICS`].
    pub fn get(&self, i: usize) -> Option<f64> {
        [
            self.p50_us,
            self.p99_us,
            self.per_sec,
            self.cpu_us_per_msg,
            self.rss_kib,
        ][i]
    }

    fn set(&mut self, i: usize, v: Option<f64>) {
        let slot = match i {
            0 => &mut self.p50_us,
            1 => &mut self.p99_us,
            2 => &mut self.per_sec,
            3 => &mut self.cpu_us_per_msg,
            _ => &mut self.rss_kib,
        };
        *slot = v;
    }

    /// Field-by-field median of several rounds.
    pub fn median_of(rounds: &[Measurement]) -> Measurement {
        let mut m = Measurement::default();
        for i in 0..METRICS.len() {
            let values: Vec<f64> = rounds.iter().filter_map(|r| r.get(i)).collect();
            m.set(i, median(&values));
        }
        m
    }
}

/// One JSON line: the fields that apply, in a fixed order.
#[derive(Serialize)]
struct JsonRow<'a> {
    system: &'a str,
    scenario: &'a str,
    rounds: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_us_per_msg: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_kib: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// What happened to one (system, scenario) over the whole run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Successful rounds.
    pub rounds: Vec<Measurement>,
    /// Why the scenario was not run for this system.
    pub skipped: Option<String>,
    /// The last error of a failed round.
    pub error: Option<String>,
}

/// All outcomes of a run, keyed by scenario, then system name.
#[derive(Debug, Default)]
pub struct Results {
    outcomes: BTreeMap<Scenario, BTreeMap<String, Outcome>>,
}

fn system_rank(name: &str) -> usize {
    CANONICAL_ORDER
        .iter()
        .position(|s| *s == name)
        .unwrap_or(CANONICAL_ORDER.len())
}

impl Results {
    fn entry(&mut self, system: &str, scenario: Scenario) -> &mut Outcome {
        self.outcomes
            .entry(scenario)
            .or_default()
            .entry(system.to_string())
            .or_default()
    }

    /// Records one successful round.
    pub fn add_round(&mut self, system: &str, scenario: Scenario, m: Measurement) {
        self.entry(system, scenario).rounds.push(m);
    }

    /// Records that a scenario does not apply to a system.
    pub fn skip(&mut self, system: &str, scenario: Scenario, reason: &str) {
        self.entry(system, scenario).skipped = Some(reason.to_string());
    }

    /// Records a failed round.
    pub fn fail(&mut self, system: &str, scenario: Scenario, error: &str) {
        self.entry(system, scenario).error = Some(error.to_string());
    }

    /// (scenario, system, outcome) in report order: scenarios in their
    /// fixed order, systems in canonical order.
    fn rows(&self) -> Vec<(Scenario, &str, &Outcome)> {
        let mut rows = Vec::new();
        for (scenario, systems) in &self.outcomes {
            let mut names: Vec<&String> = systems.keys().collect();
            names.sort_by_key(|n| (system_rank(n), n.to_string()));
            for name in names {
                rows.push((*scenario, name.as_str(), &systems[name]));
            }
        }
        rows
    }

    /// One JSON object per scenario and system.
    pub fn json_lines(&self) -> Vec<String> {
        self.rows()
            .into_iter()
            .map(|(scenario, system, outcome)| {
                let m = Measurement::median_of(&outcome.rounds);
                let row = JsonRow {
                    system,
                    scenario: scenario.name(),
                    rounds: outcome.rounds.len(),
                    p50_us: m.p50_us.map(round_for_json),
                    p99_us: m.p99_us.map(round_for_json),
                    per_sec: m.per_sec.map(round_for_json),
                    cpu_us_per_msg: m.cpu_us_per_msg.map(round_for_json),
                    rss_kib: m.rss_kib.map(round_for_json),
                    skipped: outcome.skipped.as_deref(),
                    error: outcome.error.as_deref(),
                };
                serde_json::to_string(&row).expect("plain data serializes")
            })
            .collect()
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = write!(out, "{:<20} {:<12}", "scenario", "system");
        for heading in METRICS {
            let _ = write!(out, " {heading:>12}");
        }
        let _ = writeln!(out, " {:>6}", "rounds");
        let mut last = None;
        for (scenario, system, outcome) in self.rows() {
            let name = if last == Some(scenario) {
                ""
            } else {
                scenario.name()
            };
            last = Some(scenario);
            let _ = write!(out, "{name:<20} {system:<12}");
            if outcome.rounds.is_empty() {
                let why = match (&outcome.skipped, &outcome.error) {
                    (Some(reason), _) => format!("skipped: {reason}"),
                    (None, Some(error)) => format!("failed: {}", first_line(error)),
                    (None, None) => "no data".to_string(),
                };
                let _ = writeln!(out, " {why}");
                continue;
            }
            let m = Measurement::median_of(&outcome.rounds);
            for i in 0..METRICS.len() {
                let cell = m.get(i).map(|v| format_value(i, v)).unwrap_or("-".into());
                let _ = write!(out, " {cell:>12}");
            }
            let _ = write!(out, " {:>6}", outcome.rounds.len());
            if let Some(error) = &outcome.error {
                let _ = write!(out, "  (a round failed: {})", first_line(error));
            }
            let _ = writeln!(out);
        }
        out
    }

    /// Ratios "first / second" for every pair of systems (in canonical
    /// order) and every metric both measured, one row per scenario and
    /// metric.
    pub fn ratios(&self) -> String {
        let mut systems: Vec<&str> = self
            .outcomes
            .values()
            .flat_map(|s| s.iter())
            .filter(|(_, o)| !o.rounds.is_empty())
            .map(|(n, _)| n.as_str())
            .collect();
        systems.sort_by_key(|n| (system_rank(n), n.to_string()));
        systems.dedup();
        let pairs: Vec<(&str, &str)> = systems
            .iter()
            .enumerate()
            .flat_map(|(i, a)| systems[i + 1..].iter().map(move |b| (*a, *b)))
            .collect();
        if pairs.is_empty() {
            return String::new();
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ratios first/second system (per_sec: higher is better; latency, cpu, rss: lower is better)"
        );
        let width = pairs
            .iter()
            .map(|(a, b)| a.len() + b.len() + 1)
            .max()
            .unwrap_or(0)
            .max(8);
        let _ = write!(out, "{:<20} {:<12}", "scenario", "metric");
        for (a, b) in &pairs {
            let _ = write!(out, " {:>width$}", format!("{a}/{b}"));
        }
        let _ = writeln!(out);
        for (scenario, by_system) in &self.outcomes {
            let medians: BTreeMap<&str, Measurement> = by_system
                .iter()
                .filter(|(_, o)| !o.rounds.is_empty())
                .map(|(n, o)| (n.as_str(), Measurement::median_of(&o.rounds)))
                .collect();
            for (i, heading) in METRICS.iter().enumerate() {
                let cells: Vec<Option<f64>> = pairs
                    .iter()
                    .map(|(a, b)| {
                        let x = medians.get(a)?.get(i)?;
                        let y = medians.get(b)?.get(i)?;
                        (y != 0.0).then(|| x / y)
                    })
                    .collect();
                if cells.iter().all(Option::is_none) {
                    continue;
                }
                let _ = write!(out, "{:<20} {heading:<12}", scenario.name());
                for c in cells {
                    let cell = c.map(|r| format!("{r:.2}")).unwrap_or("-".into());
                    let _ = write!(out, " {cell:>width$}");
                }
                let _ = writeln!(out);
            }
        }
        out
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn round_for_json(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Formats metric `i` of [`METRICS`] for the table.
pub fn format_value(i: usize, v: f64) -> String {
    match i {
        2 => group_thousands(v.round() as i64),
        3 => format!("{v:.3}"),
        4 => format!("{v:.2}"),
        _ if v >= 10_000.0 => group_thousands(v.round() as i64),
        _ => format!("{v:.1}"),
    }
}

fn group_thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p50: f64, per_sec: f64) -> Measurement {
        Measurement {
            p50_us: Some(p50),
            per_sec: Some(per_sec),
            ..Measurement::default()
        }
    }

    #[test]
    fn medians_per_field() {
        let rounds = [m(10.0, 100.0), m(30.0, 300.0), m(20.0, 200.0)];
        let med = Measurement::median_of(&rounds);
        assert_eq!(med.p50_us, Some(20.0));
        assert_eq!(med.per_sec, Some(200.0));
        assert_eq!(med.rss_kib, None);
    }

    #[test]
    fn json_lines_carry_applicable_fields_only() {
        let mut r = Results::default();
        r.add_round("relay", Scenario::Rt64OnePair, m(10.0, 1000.0));
        r.skip("dbus-daemon", Scenario::Rt1GiB, "too big");
        let lines = r.json_lines();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(r#"{"system":"relay","scenario":"rt64_1pair","rounds":1,"#));
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["system"], "relay");
        assert_eq!(first["scenario"], "rt64_1pair");
        assert_eq!(first["rounds"], 1);
        assert_eq!(first["p50_us"], 10.0);
        assert!(first.get("rss_kib").is_none());
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["skipped"], "too big");
    }

    #[test]
    fn ratios_follow_canonical_order() {
        let mut r = Results::default();
        r.add_round("dbus-daemon", Scenario::Rt64OnePair, m(100.0, 10.0));
        r.add_round("relay", Scenario::Rt64OnePair, m(25.0, 40.0));
        r.add_round("pbus", Scenario::Rt64OnePair, m(50.0, 20.0));
        let text = r.ratios();
        assert!(text.contains("pbus/relay"));
        assert!(text.contains("pbus/dbus-daemon"));
        assert!(text.contains("relay/dbus-daemon"));
        assert!(!text.contains("relay/pbus"));
        let p50_row = text.lines().find(|l| l.contains("p50_us")).unwrap();
        assert!(p50_row.contains("2.00") && p50_row.contains("0.50") && p50_row.contains("0.25"));
    }

    #[test]
    fn formatting() {
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(group_thousands(-1000), "-1,000");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(format_value(0, 12.345), "12.3");
        assert_eq!(format_value(0, 123_456.0), "123,456");
    }
}
