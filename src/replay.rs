//! `colloquy replay`: rebuild or verify read models, with a progress bar (rate and ETA)
//! on a terminal and plain log lines otherwise.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use colloquy_projections::{Projection, all_projections, by_name, replay};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::ReplayArgs;
use crate::config::Config;

/// Runs `colloquy replay`.
pub async fn run(config: &Config, args: &ReplayArgs) -> anyhow::Result<()> {
    // A verify holds its scratch lock, its comparison transaction, a batch and a read at
    // once.
    let (db, store) = crate::app::open_database(config, 5).await?;
    let projections: Vec<Arc<dyn Projection>> = if args.all {
        all_projections()
    } else {
        let name = args.projection.as_deref().unwrap_or_default();
        vec![by_name(name).with_context(|| {
            format!("no projection named {name:?} (there are: messages, runs, search)")
        })?]
    };
    let mut differences = 0;
    for projection in projections {
        let started = Instant::now();
        let reporter = Reporter::new(projection.name(), args.verify);
        let progress = |at: i64, head: i64| reporter.report(at, head);
        if args.verify {
            let found = replay::verify(&db, &store, projection.as_ref(), &progress).await?;
            reporter.finish();
            if found.is_empty() {
                println!(
                    "{}: no difference ({:.1?})",
                    projection.name(),
                    started.elapsed()
                );
            }
            for d in &found {
                println!("{}: {} {} {}", projection.name(), d.table, d.kind, d.key);
            }
            differences += found.len();
        } else {
            let reached = replay::rebuild(&db, &store, projection.as_ref(), &progress).await?;
            reporter.finish();
            println!(
                "{}: rebuilt to position {reached} and swapped in ({:.1?})",
                projection.name(),
                started.elapsed()
            );
        }
    }
    if differences > 0 {
        anyhow::bail!("{differences} difference(s) between the live read models and the log");
    }
    Ok(())
}

/// A progress bar on a terminal, a log line every few seconds otherwise.
struct Reporter {
    name: &'static str,
    bar: Option<ProgressBar>,
    last_line: Mutex<Instant>,
    started: Instant,
}

impl Reporter {
    fn new(name: &'static str, verify: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>10} [{bar:40}] {pos}/{len} events {per_sec} eta {eta}",
                )
                .expect("BUG: the template is valid")
                .progress_chars("=> "),
            );
            bar.set_prefix(if verify {
                format!("verify {name}")
            } else {
                name.to_owned()
            });
            bar
        });
        Self {
            name,
            bar,
            last_line: Mutex::new(Instant::now()),
            started: Instant::now(),
        }
    }

    fn report(&self, at: i64, head: i64) {
        let (at, head) = (at.max(0).unsigned_abs(), head.max(0).unsigned_abs());
        if let Some(bar) = &self.bar {
            bar.set_length(head);
            bar.set_position(at);
            return;
        }
        let mut last = self
            .last_line
            .lock()
            .expect("BUG: the lock is never poisoned");
        if last.elapsed() >= Duration::from_secs(2) || at == head {
            *last = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            #[expect(clippy::cast_precision_loss, reason = "a rate for humans")]
            let rate = at as f64 / secs;
            tracing::info!(
                projection = self.name,
                position = at,
                head,
                rate = rate as u64,
                "replaying"
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
