//! Request accounting: per-endpoint latency histograms, errors by kind, a one-second
//! timeline for the plot, and convergence times.
//!
//! Everything runs on the single client thread, so plain `RefCell`s suffice and recording a
//! request costs a histogram increment, not a lock.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds up to this bound (one minute).
const MAX_LATENCY_US: u64 = 60_000_000;

fn histogram(significant_figures: u8) -> Histogram<u64> {
    // `auto` keeps outliers beyond the bound recordable.
    let mut histogram = Histogram::new_with_bounds(1, MAX_LATENCY_US, significant_figures)
        .expect("constant histogram bounds are valid");
    histogram.auto(true);
    histogram
}

/// What one endpoint saw.
pub struct EndpointStats {
    pub latency_us: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    /// When the first request to this endpoint completed, since the run started.
    first: Duration,
    /// When the last one completed.
    last: Duration,
}

impl EndpointStats {
    fn new(now: Duration) -> Self {
        Self {
            latency_us: histogram(3),
            errors: BTreeMap::new(),
            first: now,
            last: now,
        }
    }

    /// Seconds during which this endpoint was in use: from the start of its first request
    /// to the end of its last, so its rate is not diluted by phases that never called it.
    pub fn active_seconds(&self) -> f64 {
        (self.last - self.first).as_secs_f64()
    }

    /// Every attempt: answered ones are in the histogram, failed ones in `errors`.
    pub fn requests(&self) -> u64 {
        self.latency_us.len() + self.error_count()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One second of the run, for throughput and p99 over time.
struct Second {
    requests: u64,
    latency_us: Histogram<u64>,
}

/// All measurements of one run.
pub struct Stats {
    started: Instant,
    endpoints: RefCell<BTreeMap<&'static str, EndpointStats>>,
    timeline: RefCell<Vec<Second>>,
    total: Cell<u64>,
    pushes: Cell<u64>,
    convergence_ms: RefCell<Histogram<u64>>,
    /// When the latest failed request ended, from the start.
    last_failure: Cell<Option<Duration>>,
}

impl Stats {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            endpoints: RefCell::new(BTreeMap::new()),
            timeline: RefCell::new(Vec::new()),
            total: Cell::new(0),
            pushes: Cell::new(0),
            convergence_ms: RefCell::new(histogram(3)),
            last_failure: Cell::new(None),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records an answered request (`error` = None) or a failed one with its kind.
    pub fn record(&self, endpoint: &'static str, latency: Duration, error: Option<String>) {
        self.total.set(self.total.get() + 1);
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_LATENCY_US);
        let now = self.started.elapsed();
        let mut endpoints = self.endpoints.borrow_mut();
        let stats = endpoints
            .entry(endpoint)
            .or_insert_with(|| EndpointStats::new(now.saturating_sub(latency)));
        stats.last = now;
        match error {
            None => {
                let _ = stats.latency_us.record(micros.max(1));
            }
            Some(kind) => {
                *stats.errors.entry(kind).or_default() += 1;
                self.last_failure.set(Some(now));
            }
        }
        let second = usize::try_from(now.as_secs()).unwrap_or(usize::MAX);
        let mut timeline = self.timeline.borrow_mut();
        while timeline.len() <= second && timeline.len() < 86_400 {
            timeline.push(Second {
                requests: 0,
                latency_us: histogram(2),
            });
        }
        if let Some(bucket) = timeline.get_mut(second) {
            bucket.requests += 1;
            let _ = bucket.latency_us.record(micros.max(1));
        }
    }

    pub fn push_received(&self) {
        self.pushes.set(self.pushes.get() + 1);
    }

    /// When the latest failed request ended, from the start of the run.
    pub fn last_failure(&self) -> Option<Duration> {
        self.last_failure.get()
    }

    pub fn pushes(&self) -> u64 {
        self.pushes.get()
    }

    pub fn total_requests(&self) -> u64 {
        self.total.get()
    }

    /// A device finished the scenario `elapsed` after the measured phase began.
    pub fn converged(&self, elapsed: Duration) {
        let millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let _ = self.convergence_ms.borrow_mut().record(millis.max(1));
    }

    pub fn reset_convergence(&self) {
        self.convergence_ms.borrow_mut().reset();
    }

    pub fn with_endpoints<R>(
        &self,
        read: impl FnOnce(&BTreeMap<&'static str, EndpointStats>) -> R,
    ) -> R {
        read(&self.endpoints.borrow())
    }

    /// `(count, p50, p90, p99, max)` convergence times in milliseconds.
    pub fn convergence(&self) -> Option<[u64; 5]> {
        let histogram = self.convergence_ms.borrow();
        (!histogram.is_empty()).then(|| {
            [
                histogram.len(),
                histogram.value_at_quantile(0.5),
                histogram.value_at_quantile(0.9),
                histogram.value_at_quantile(0.99),
                histogram.max(),
            ]
        })
    }

    /// `(requests, p99 µs)` per elapsed second.
    pub fn timeline(&self) -> Vec<(u64, u64)> {
        self.timeline
            .borrow()
            .iter()
            .map(|second| {
                let p99 = if second.latency_us.is_empty() {
                    0
                } else {
                    second.latency_us.value_at_quantile(0.99)
                };
                (second.requests, p99)
            })
            .collect()
    }
}

/// Milliseconds with microsecond resolution, for reports.
pub fn millis(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// An SVG with requests/s (bars) and p99 latency (line) per second; hand-written so the
/// tool needs no plotting stack.
pub fn svg(timeline: &[(u64, u64)], title: &str) -> String {
    const WIDTH: f64 = 900.0;
    const HEIGHT: f64 = 420.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 70.0;
    const TOP: f64 = 40.0;
    const BOTTOM: f64 = 40.0;
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let seconds = timeline.len().max(1) as f64;
    let max_rps = timeline.iter().map(|s| s.0).max().unwrap_or(0).max(1) as f64;
    let max_p99_ms = timeline.iter().map(|s| s.1).max().unwrap_or(0).max(1) as f64 / 1000.0;
    let bar_width = (plot_width / seconds).max(1.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"22\" font-size=\"15\">{}</text>\n",
        escape(title)
    );
    for (index, (requests, _)) in timeline.iter().enumerate() {
        let height = *requests as f64 / max_rps * plot_height;
        out.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#8ab4f8\"/>\n",
            LEFT + index as f64 * plot_width / seconds,
            TOP + plot_height - height,
            bar_width,
            height
        ));
    }
    let points: Vec<String> = timeline
        .iter()
        .enumerate()
        .map(|(index, (_, p99))| {
            format!(
                "{:.1},{:.1}",
                LEFT + (index as f64 + 0.5) * plot_width / seconds,
                TOP + plot_height - (*p99 as f64 / 1000.0) / max_p99_ms * plot_height
            )
        })
        .collect();
    out.push_str(&format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#d93025\" stroke-width=\"2\"/>\n",
        points.join(" ")
    ));
    out.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
         <line x1=\"{right}\" y1=\"{TOP}\" x2=\"{right}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
         <text x=\"{LEFT}\" y=\"{top_label}\" fill=\"#1a73e8\">requests/s (max {max_rps:.0})</text>\n\
         <text x=\"{right}\" y=\"{top_label}\" text-anchor=\"end\" fill=\"#d93025\">p99 latency (max {max_p99_ms:.1} ms)</text>\n\
         <text x=\"{LEFT}\" y=\"{time_label}\">0 s</text>\n\
         <text x=\"{right}\" y=\"{time_label}\" text-anchor=\"end\">{seconds:.0} s</text>\n\
         </svg>\n",
        bottom = TOP + plot_height,
        right = LEFT + plot_width,
        top_label = TOP - 4.0,
        time_label = TOP + plot_height + 18.0,
    ));
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_and_failed_requests_are_both_counted_per_endpoint() {
        let stats = Stats::new();
        stats.record("connect:Idle", Duration::from_millis(2), None);
        stats.record("connect:Idle", Duration::from_millis(4), None);
        stats.record(
            "connect:Idle",
            Duration::from_millis(1),
            Some("status 500".into()),
        );
        stats.with_endpoints(|endpoints| {
            let idle = &endpoints["connect:Idle"];
            assert_eq!(idle.requests(), 3);
            assert_eq!(idle.errors["status 500"], 1);
            assert!(idle.latency_us.value_at_quantile(0.99) >= 3_990);
        });
        assert_eq!(stats.total_requests(), 3);
        assert_eq!(stats.timeline()[0].0, 3);
    }

    #[test]
    fn convergence_percentiles_appear_once_a_device_converged() {
        let stats = Stats::new();
        assert_eq!(stats.convergence(), None);
        stats.converged(Duration::from_millis(120));
        let [count, p50, ..] = stats.convergence().unwrap();
        assert_eq!(count, 1);
        assert!((119..=121).contains(&p50));
    }

    #[test]
    fn the_plot_has_one_bar_per_second_and_a_latency_line() {
        let svg = svg(&[(10, 1000), (20, 3000)], "checkin <flat out>");
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("fill=\"#8ab4f8\"").count(), 2);
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("checkin &lt;flat out&gt;"));
    }
}
