//! What benchmarks report: latency histograms, one row per scenario, the plain-text
//! table, target checks and facts about the machine the figures came from.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::Value;

/// A latency histogram in microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("BUG: constant bounds are valid")
}

/// Records one latency.
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    histogram.saturating_record(
        u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1),
    );
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
            mean_ms: histogram.mean() / 1000.0,
        }
    }
}

/// One scenario's result: one row of the table, one element of the JSON `scenarios`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// A stable key for scripts, e.g. `distinct_streams`.
    pub key: &'static str,
    /// What the table shows.
    pub name: String,
    /// Events written or read while measuring.
    pub events: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    /// What one latency sample is (e.g. "append", "1000-event page").
    pub latency_of: &'static str,
    pub latency: Latency,
    /// Events per second divided by the raw-insert ceiling's, for write scenarios.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_raw: Option<f64>,
    /// Operations that failed (not counted in `events`).
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Scenario-specific figures (batch sizes, conflicts, heap bytes …).
    pub details: Value,
    /// A short human summary of `details`, for the table.
    #[serde(skip)]
    pub notes: String,
}

/// A target from the design, checked against a measured value.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// e.g. "≥ 1.00".
    pub target: String,
    pub met: bool,
}

/// Formats a number with thousands separators and no decimals.
pub fn thousands(value: f64) -> String {
    let rounded = value.round();
    let digits = format!("{:.0}", rounded.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The rows as a plain, aligned text table.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "scenario",
        "events",
        "events/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "÷ raw",
        "latency of",
        "notes",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                thousands(r.events as f64),
                thousands(r.events_per_sec),
                ms(r.latency.p50_ms),
                ms(r.latency.p99_ms),
                ms(r.latency.max_ms),
                r.ratio_to_raw
                    .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}")),
                r.latency_of.to_owned(),
                r.notes.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Text columns left-aligned, numbers right-aligned.
    let left = |i: usize| i == 0 || i >= 7;
    let line = |row: &[String]| {
        let mut out = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if left(i) {
                out.push_str(cell);
                if i + 1 < row.len() {
                    out.push_str(&" ".repeat(pad));
                }
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(&header.map(str::to_owned));
    out.push('\n');
    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push_str(&"-".repeat(total.min(160)));
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// The target checks as text lines.
pub fn targets(targets: &[Target]) -> String {
    let width = targets
        .iter()
        .map(|t| t.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for t in targets {
        let value = if t.unit == "events/s" || t.value.abs() >= 1000.0 {
            thousands(t.value)
        } else {
            format!("{:.2}", t.value)
        };
        out.push_str(&format!(
            "  {:width$}  {value} {} (target {}): {}\n",
            t.name,
            t.unit,
            t.target,
            if t.met { "met" } else { "NOT MET" },
        ));
    }
    out
}

/// Facts about where the figures came from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// UTC, RFC 3339.
    pub date: String,
    pub cpus: usize,
    pub memory_gib: Option<f64>,
    /// 1, 5 and 15-minute load averages when the run started and ended.
    pub load_before: Option<[f64; 3]>,
    pub load_after: Option<[f64; 3]>,
    pub postgres: Value,
    /// The NATS server's version, for benchmarks that use NATS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<String>,
}

impl Machine {
    /// Reads the machine's facts and the server's version and durability settings.
    pub async fn probe(pool: &sqlx::PgPool) -> Self {
        let mut postgres = serde_json::Map::new();
        for setting in [
            "server_version",
            "fsync",
            "synchronous_commit",
            "shared_buffers",
            "max_connections",
        ] {
            if let Ok(value) = sqlx::query_scalar::<_, String>("SELECT current_setting($1)")
                .bind(setting)
                .fetch_one(pool)
                .await
            {
                postgres.insert(setting.to_owned(), Value::String(value));
            }
        }
        Self {
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            memory_gib: memory_gib(),
            load_before: load_average(),
            load_after: None,
            postgres: Value::Object(postgres),
            nats: None,
        }
    }

    /// One line for the table's heading.
    pub fn summary(&self) -> String {
        let load = |l: Option<[f64; 3]>| {
            l.map_or_else(
                || "?".to_owned(),
                |[a, b, c]| format!("{a:.2} {b:.2} {c:.2}"),
            )
        };
        let pg = |key: &str| {
            self.postgres
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned()
        };
        let nats = self
            .nats
            .as_deref()
            .map_or_else(String::new, |v| format!("; NATS {v}"));
        format!(
            "{date}; {cpus} CPUs, {mem} GiB; Postgres {version} (fsync {fsync}, synchronous_commit {sync}, shared_buffers {sb}){nats}; load average {before} before, {after} after",
            date = self.date,
            cpus = self.cpus,
            mem = self
                .memory_gib
                .map_or_else(|| "?".to_owned(), |m| format!("{m:.0}")),
            version = pg("server_version"),
            fsync = pg("fsync"),
            sync = pg("synchronous_commit"),
            sb = pg("shared_buffers"),
            before = load(self.load_before),
            after = load(self.load_after),
        )
    }
}

/// The 1, 5 and 15-minute load averages (Linux).
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    Some([
        fields.next()?.ok()?,
        fields.next()?.ok()?,
        fields.next()?.ok()?,
    ])
}

/// A process's memory, from `/proc/<pid>/status` (Linux).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcessMemory {
    /// Resident set size now (`VmRSS`), MB (10⁶ bytes).
    pub rss_mb: f64,
    /// The largest resident set size so far (`VmHWM`), MB.
    pub peak_rss_mb: f64,
}

impl ProcessMemory {
    /// The memory of process `pid`, or of this process with `None`.
    pub fn of(pid: Option<u32>) -> Option<Self> {
        let path = pid.map_or_else(
            || "/proc/self/status".to_owned(),
            |pid| format!("/proc/{pid}/status"),
        );
        let text = std::fs::read_to_string(path).ok()?;
        let field = |name: &str| -> Option<f64> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024.0 / 1e6)
        };
        Some(Self {
            rss_mb: field("VmRSS:")?,
            peak_rss_mb: field("VmHWM:")?,
        })
    }
}

/// CPU seconds (user + system) process `pid` (or this one, with `None`) has used,
/// from `/proc/<pid>/stat`. Linux reports them in clock ticks of 1/100 s (`USER_HZ`,
/// 100 on every mainstream architecture).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |pid| format!("/proc/{pid}/stat"),
    );
    let text = std::fs::read_to_string(path).ok()?;
    // The command name is in parentheses and may contain spaces: count fields after it.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime); `rest` starts at field 3 (state).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU seconds used so far by every process named `name` (the command name, e.g.
/// `postgres` for the server and all its backends), from `/proc/*/stat`. Processes
/// that exit take their time with them, so a delta is only meaningful over processes
/// that live through it (connection pools, servers).
pub fn cpu_seconds_named(name: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut total = 0.0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let comm = text
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map(|(comm, _)| comm);
        if comm == Some(name) {
            total += cpu_seconds(Some(pid)).unwrap_or(0.0);
        }
    }
    total
}

/// CPU time of this process, Postgres and NATS, read before a scenario; [`CpuUse::since`]
/// turns it into cores used.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: std::time::Instant,
    process: f64,
    postgres: f64,
    nats: f64,
}

/// Cores (CPU seconds per second) used over a scenario.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    /// This process (with the application in it, and the load generator).
    pub process: f64,
    /// Every `postgres` process.
    pub postgres: f64,
    /// Every `nats-server` process.
    pub nats: f64,
}

impl CpuMark {
    pub fn now() -> Self {
        Self {
            at: std::time::Instant::now(),
            process: cpu_seconds(None).unwrap_or(0.0),
            postgres: cpu_seconds_named("postgres"),
            nats: cpu_seconds_named("nats-server"),
        }
    }
}

impl CpuUse {
    /// The cores used since `mark`.
    pub fn since(mark: CpuMark) -> Self {
        let now = CpuMark::now();
        let seconds = now.at.duration_since(mark.at).as_secs_f64().max(1e-9);
        Self {
            process: (now.process - mark.process) / seconds,
            postgres: (now.postgres - mark.postgres) / seconds,
            nats: (now.nats - mark.nats) / seconds,
        }
    }

    /// e.g. "CPU cores: this process 0.64, Postgres 1.10, NATS 0.05".
    pub fn text(&self, process: &str) -> String {
        format!(
            "CPU cores: {process} {:.2}, Postgres {:.2}, NATS {:.2}",
            self.process, self.postgres, self.nats
        )
    }
}

/// This process's soft limit on open files (`/proc/self/limits`).
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Prints a benchmark's rows and targets as a table, or as one JSON document with the
/// machine, the settings the run used and anything `extra` holds.
pub fn print(
    title: &str,
    machine: &Machine,
    settings: Value,
    rows: &[Row],
    targets_met: &[Target],
    extra: Value,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let mut document = serde_json::json!({
            "command": title,
            "settings": settings,
            "machine": machine,
            "scenarios": rows,
            "targets": targets_met,
        });
        if let (Value::Object(document), Value::Object(extra)) = (&mut document, extra) {
            document.extend(extra);
        }
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        println!("{title}\n{}\n\n{}", machine.summary(), table(rows));
        if !targets_met.is_empty() {
            println!("targets:\n{}", targets(targets_met));
        }
    }
    Ok(())
}

fn memory_gib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-12_345.0), "-12,345");
    }

    #[test]
    fn latency_is_read_in_milliseconds() {
        let mut h = histogram();
        for us in 1..=1000 {
            record(&mut h, Duration::from_micros(us));
        }
        let l = Latency::of(&h);
        assert!((l.p50_ms - 0.5).abs() < 0.01, "{l:?}");
        assert!((l.max_ms - 1.0).abs() < 0.01, "{l:?}");
        assert_eq!(Latency::of(&histogram()).p99_ms, 0.0);
    }

    #[test]
    fn table_aligns_columns() {
        let row = Row {
            key: "k",
            name: "distinct streams".to_owned(),
            events: 12_345,
            seconds: 1.0,
            events_per_sec: 12_345.0,
            latency_of: "append",
            latency: Latency::default(),
            ratio_to_raw: Some(1.5),
            errors: 0,
            first_error: None,
            details: Value::Null,
            notes: "n".to_owned(),
        };
        let text = table(&[row.clone(), row]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2], lines[3]);
        assert!(lines[2].contains("12,345"));
        assert!(lines[2].contains("1.50"));
    }
}
