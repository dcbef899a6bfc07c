//! Pull progress: bars per layer on a TTY, a one-line status otherwise (what the worker reports).

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Line {
    total: u64,
    layers: HashMap<String, (u64, u64)>, // short digest -> (done, size)
    last_print: Option<Instant>,
    started: Option<Instant>,
}

enum Mode {
    Bars(MultiProgress, Mutex<HashMap<String, ProgressBar>>),
    Lines(Mutex<Line>),
    Quiet,
}

/// Shared by the layer tasks of one pull.
#[derive(Clone)]
pub struct Progress {
    mode: Arc<Mode>,
    /// Called with a one-line status ("Pulling: 12.3 MB / 40.0 MB") at most once a second.
    status: Option<Arc<dyn Fn(String) + Send + Sync>>,
    status_state: Arc<Mutex<Line>>,
}

pub fn human(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise; nothing when `quiet`.
    pub fn auto(quiet: bool) -> Progress {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bars(
                MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)),
                Mutex::new(HashMap::new()),
            )
        } else {
            Mode::Lines(Mutex::new(Line::default()))
        };
        Progress {
            mode: Arc::new(mode),
            status: None,
            status_state: Arc::new(Mutex::new(Line::default())),
        }
    }

    pub fn quiet() -> Progress {
        Progress::auto(true)
    }

    /// Also report a one-line status through `f` (the worker's run status).
    pub fn with_status(mut self, f: Arc<dyn Fn(String) + Send + Sync>) -> Progress {
        self.status = Some(f);
        self
    }

    pub fn message(&self, msg: &str) {
        match &*self.mode {
            Mode::Bars(mp, _) => {
                let _ = mp.println(msg);
            }
            Mode::Lines(_) => eprintln!("{msg}"),
            Mode::Quiet => {}
        }
    }

    pub fn layer_start(&self, id: &str, size: u64) {
        match &*self.mode {
            Mode::Bars(mp, bars) => {
                let pb = mp.add(ProgressBar::new(size));
                pb.set_style(
                    ProgressStyle::with_template("{prefix:.bold} {bar:30.cyan/blue} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {msg}")
                        .unwrap()
                        .progress_chars("=> "),
                );
                pb.set_prefix(id.to_string());
                bars.lock().unwrap().insert(id.to_string(), pb);
            }
            Mode::Lines(l) => {
                let mut l = l.lock().unwrap();
                l.total += size;
                l.layers.insert(id.to_string(), (0, size));
                l.started.get_or_insert_with(Instant::now);
            }
            Mode::Quiet => {}
        }
        let mut s = self.status_state.lock().unwrap();
        s.total += size;
        s.layers.insert(id.to_string(), (0, size));
    }

    pub fn layer_bytes(&self, id: &str, n: u64) {
        match &*self.mode {
            Mode::Bars(_, bars) => {
                if let Some(pb) = bars.lock().unwrap().get(id) {
                    pb.inc(n);
                }
            }
            Mode::Lines(l) => {
                let mut l = l.lock().unwrap();
                if let Some(e) = l.layers.get_mut(id) {
                    e.0 += n;
                }
                let due = l
                    .last_print
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                if due {
                    l.last_print = Some(Instant::now());
                    let done: u64 = l.layers.values().map(|v| v.0).sum();
                    let rate = l
                        .started
                        .map(|s| done as f64 / s.elapsed().as_secs_f64().max(0.001))
                        .unwrap_or(0.0);
                    eprintln!(
                        "pulling: {} / {} ({}/s)",
                        human(done),
                        human(l.total),
                        human(rate as u64)
                    );
                }
            }
            Mode::Quiet => {}
        }
        if let Some(f) = &self.status {
            let mut s = self.status_state.lock().unwrap();
            if let Some(e) = s.layers.get_mut(id) {
                e.0 += n;
            }
            if s.last_print
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                s.last_print = Some(Instant::now());
                let done: u64 = s.layers.values().map(|v| v.0).sum();
                f(format!(
                    "Pulling image: {} / {}",
                    human(done),
                    human(s.total)
                ));
            }
        }
    }

    pub fn layer_done(&self, id: &str, what: &str) {
        match &*self.mode {
            Mode::Bars(_, bars) => {
                if let Some(pb) = bars.lock().unwrap().get(id) {
                    pb.finish_with_message(what.to_string());
                }
            }
            Mode::Lines(_) => eprintln!("{id}: {what}"),
            Mode::Quiet => {}
        }
    }
}
