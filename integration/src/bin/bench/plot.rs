//! `--plot <path.svg>`: latency percentiles over time.
//!
//! A [`Timeline`] keeps one HDR histogram per 1 s bin of receive time (bin `i` holds the
//! samples received in `[origin + i s, origin + (i + 1) s)`); percentiles are taken per bin
//! after merging (worker processes send their bins as hdrhistogram V2 hex, see `workers.rs`).
//! [`render_svg`] draws p50/p90/p99/max per second as a hand-written SVG.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::workers::{hist_from_hex, hist_to_hex};

/// Bins kept at most (an hour); later samples go into the last one.
pub const MAX_BINS: usize = 3_600;
const NS_PER_S: u64 = 1_000_000_000;

/// One bin's histogram: µs, 1 µs .. 10 min, 2 significant digits (small: one per second).
fn bin_hist() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, 600_000_000, 2).map_err(|e| format!("histogram: {e}"))
}

/// The bin of a sample received at `recv_ns` (same clock as `origin_ns`).
pub fn bin_of(origin_ns: u64, recv_ns: u64) -> usize {
    ((recv_ns.saturating_sub(origin_ns) / NS_PER_S) as usize).min(MAX_BINS - 1)
}

/// Per-second latency histograms since `origin_ns`.
#[derive(Clone, Debug)]
pub struct Timeline {
    pub origin_ns: u64,
    bins: Vec<Option<Histogram<u64>>>,
}

/// One second of a timeline, in ms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Start of the bin, seconds since the scenario's start.
    pub t_s: f64,
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Timeline {
    pub fn new(origin_ns: u64) -> Self {
        Self {
            origin_ns,
            bins: Vec::new(),
        }
    }

    fn bin_mut(&mut self, i: usize) -> Result<&mut Histogram<u64>, String> {
        let i = i.min(MAX_BINS - 1);
        if self.bins.len() <= i {
            self.bins.resize(i + 1, None);
        }
        match &mut self.bins[i] {
            Some(h) => Ok(h),
            slot => Ok(slot.insert(bin_hist()?)),
        }
    }

    /// Books one latency sample (µs) received at `recv_ns`.
    pub fn record(&mut self, recv_ns: u64, latency_us: u64) {
        if let Ok(h) = self.bin_mut(bin_of(self.origin_ns, recv_ns)) {
            h.saturating_record(latency_us.max(1));
        }
    }

    /// Non-empty bins as `(index, V2 hex)`, for a worker's report.
    pub fn to_wire(&self) -> Result<Vec<(usize, String)>, String> {
        self.bins
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().filter(|h| !h.is_empty()).map(|h| (i, h)))
            .map(|(i, h)| Ok((i, hist_to_hex(h)?)))
            .collect()
    }

    /// Adds bins sent by [`Timeline::to_wire`] (same origin).
    pub fn merge_wire(&mut self, wire: &[(usize, String)]) -> Result<(), String> {
        for (i, hex) in wire {
            let h = hist_from_hex(hex)?;
            self.bin_mut(*i)?
                .add(&h)
                .map_err(|e| format!("merge histogram: {e}"))?;
        }
        Ok(())
    }

    /// Non-empty seconds, their start relative to `start_ns` (the scenario's start, same
    /// clock as the origin).
    pub fn points(&self, start_ns: u64) -> Vec<Point> {
        let shift_s = (self.origin_ns as f64 - start_ns as f64) / 1e9;
        let ms = |us: u64| us as f64 / 1000.0;
        self.bins
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().filter(|h| !h.is_empty()).map(|h| (i, h)))
            .map(|(i, h)| Point {
                t_s: i as f64 + shift_s,
                count: h.len(),
                p50_ms: ms(h.value_at_quantile(0.5)),
                p90_ms: ms(h.value_at_quantile(0.9)),
                p99_ms: ms(h.value_at_quantile(0.99)),
                max_ms: ms(h.max()),
            })
            .collect()
    }
}

/// A timeline shared by the tasks of one process; disabled (free) without `--plot`.
#[derive(Clone, Default)]
pub struct Recorder(Option<Arc<Mutex<Timeline>>>);

impl Recorder {
    pub fn new(enabled: bool, origin_ns: u64) -> Self {
        Self(enabled.then(|| Arc::new(Mutex::new(Timeline::new(origin_ns)))))
    }

    /// Moves the origin (before any sample is recorded: the scenario's start).
    pub fn set_origin(&self, origin_ns: u64) {
        if let Some(t) = &self.0 {
            t.lock().unwrap_or_else(|e| e.into_inner()).origin_ns = origin_ns;
        }
    }

    pub fn record(&self, recv_ns: u64, latency_us: u64) {
        if let Some(t) = &self.0 {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(recv_ns, latency_us);
        }
    }

    pub fn snapshot(&self) -> Option<Timeline> {
        self.0
            .as_ref()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The `timeline` of a scenario's JSON: p50/p99 per second.
pub fn timeline_json(points: &[Point]) -> Value {
    points
        .iter()
        .map(|p| {
            json!({
                "t_s": (p.t_s * 1000.0).round() / 1000.0,
                "count": p.count,
                "p50_ms": p.p50_ms,
                "p99_ms": p.p99_ms,
            })
        })
        .collect()
}

/// The smallest 1, 2 or 5 × 10^k at or above `x` (`x` > 0).
pub fn nice_ceil(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 || x.is_infinite() {
        return 1.0;
    }
    let exp = x.log10().floor();
    let base = 10f64.powf(exp);
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * base >= x * (1.0 - 1e-9) {
            return m * base;
        }
    }
    10.0 * base
}

/// A tick step giving about `n` ticks over `0..=max`, and the axis end (a multiple of it).
pub fn axis(max: f64, n: f64) -> (f64, f64) {
    let step = nice_ceil(max.max(1e-9) / n);
    let end = ((max / step).ceil() * step).max(step);
    (step, end)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn label(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Latency percentiles per second as an SVG: x seconds since the start, y ms (linear).
pub fn render_svg(title: &str, subtitle: &str, points: &[Point]) -> String {
    const W: f64 = 960.0;
    const H: f64 = 540.0;
    const L: f64 = 80.0;
    const R: f64 = 150.0;
    const T: f64 = 70.0;
    const B: f64 = 60.0;
    let (pw, ph) = (W - L - R, H - T - B);
    type Series = (&'static str, &'static str, fn(&Point) -> f64);
    let series: [Series; 4] = [
        ("p50", "#1f77b4", |p| p.p50_ms),
        ("p90", "#2ca02c", |p| p.p90_ms),
        ("p99", "#ff7f0e", |p| p.p99_ms),
        ("max", "#d62728", |p| p.max_ms),
    ];
    let x_min = points.iter().map(|p| p.t_s).fold(0.0f64, f64::min).floor();
    let x_last = points.iter().map(|p| p.t_s + 1.0).fold(1.0f64, f64::max);
    let (x_step, x_span) = axis(x_last - x_min, 10.0);
    let x_step = x_step.max(1.0);
    let x_max = x_min + x_span.max(x_step);
    let y_top = points.iter().map(|p| p.max_ms).fold(0.0f64, f64::max);
    let (y_step, y_max) = axis(y_top, 6.0);
    let sx = |t: f64| L + (t - x_min) / (x_max - x_min) * pw;
    let sy = |v: f64| T + ph - (v / y_max).min(1.0) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="26" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="46" fill="#555" text-anchor="middle">{}</text>"##,
        W / 2.0,
        escape(subtitle)
    );
    // Grid, ticks and labels.
    let mut y = 0.0;
    for _ in 0..=100 {
        if y > y_max + y_step * 1e-6 {
            break;
        }
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><line x1="{:.1}" y1="{py:.1}" x2="{L}" y2="{py:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            L + pw,
            L - 5.0,
            L - 8.0,
            py + 4.0,
            label(y)
        );
        y += y_step;
    }
    let mut x = x_min;
    for _ in 0..=100 {
        if x > x_max + x_step * 1e-6 {
            break;
        }
        let px = sx(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{:.1}" stroke="#f0f0f0"/><line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="black"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            T + ph,
            T + ph,
            T + ph + 5.0,
            T + ph + 20.0,
            label(x)
        );
        x += x_step;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since start (1 s bins, plotted at the bin middle)</text>"#,
        L + pw / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">latency (ms)</text>"#,
        T + ph / 2.0
    );
    // One polyline per series, with a dot per second.
    for (k, (name, color, value)) in series.iter().enumerate() {
        let coords: Vec<String> = points
            .iter()
            .map(|p| format!("{:.1},{:.1}", sx(p.t_s + 0.5), sy(value(p))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline class="{name}" fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
            coords.join(" ")
        );
        for c in &coords {
            if let Some((cx, cy)) = c.split_once(',') {
                let _ = write!(s, r#"<circle cx="{cx}" cy="{cy}" r="2" fill="{color}"/>"#);
            }
        }
        s.push('\n');
        let ly = T + 10.0 + 20.0 * k as f64;
        let lx = L + pw + 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{name}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    let samples: u64 = points.iter().map(|p| p.count).sum();
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" fill="#555">{samples} samples</text><text x="{}" y="{}" fill="#555">{} seconds</text>"##,
        L + pw + 20.0,
        T + 100.0,
        L + pw + 20.0,
        T + 118.0,
        points.len()
    );
    if points.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">no samples</text>"#,
            L + pw / 2.0,
            T + ph / 2.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Renders and writes the SVG; prints where it went.
pub fn write_svg(path: &Path, title: &str, subtitle: &str, points: &[Point]) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, render_svg(title, subtitle, points))
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    println!("latency plot written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NS_PER_S;

    #[test]
    fn samples_fall_into_whole_second_bins() {
        assert_eq!(bin_of(10 * S, 10 * S), 0);
        assert_eq!(bin_of(10 * S, 11 * S - 1), 0);
        assert_eq!(bin_of(10 * S, 11 * S), 1);
        assert_eq!(bin_of(10 * S, 5 * S), 0, "before the origin: the first bin");
        assert_eq!(bin_of(0, u64::MAX), MAX_BINS - 1);

        let mut t = Timeline::new(100 * S);
        for ms in 1..=100u64 {
            t.record(100 * S + 10, ms * 1000);
        }
        t.record(103 * S + 5, 7_000);
        let p = t.points(100 * S);
        assert_eq!(p.len(), 2, "empty seconds are left out");
        assert_eq!((p[0].t_s, p[0].count), (0.0, 100));
        assert!((p[0].p50_ms - 50.0).abs() < 1.0, "{:?}", p[0]);
        assert!((p[0].p99_ms - 99.0).abs() < 1.5, "{:?}", p[0]);
        assert!((p[0].max_ms - 100.0).abs() < 1.5, "{:?}", p[0]);
        assert_eq!((p[1].t_s, p[1].count), (3.0, 1));
        // Relative to a later scenario start: shifted.
        assert_eq!(t.points(100 * S + S / 2)[1].t_s, 2.5);
    }

    #[test]
    fn bins_merge_across_the_pipe_before_percentiles() {
        let mut a = Timeline::new(0);
        let mut b = Timeline::new(0);
        for _ in 0..90 {
            a.record(S / 2, 1_000);
        }
        for _ in 0..10 {
            b.record(S / 2, 100_000);
        }
        b.record(2 * S, 5_000);
        let mut merged = Timeline::new(0);
        merged
            .merge_wire(&a.to_wire().expect("wire"))
            .expect("merge wire");
        merged
            .merge_wire(&b.to_wire().expect("wire"))
            .expect("merge wire");
        let p = merged.points(0);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].count, 100);
        assert!((p[0].p50_ms - 1.0).abs() < 0.05);
        assert!((p[0].p99_ms - 100.0).abs() < 1.0, "{:?}", p[0]);
        assert_eq!(p[1].t_s, 2.0);
    }

    #[test]
    fn axes_are_nice() {
        assert_eq!(nice_ceil(0.7), 1.0);
        assert_eq!(nice_ceil(1.2), 2.0);
        assert_eq!(nice_ceil(3.0), 5.0);
        assert_eq!(nice_ceil(50.0), 50.0);
        assert_eq!(nice_ceil(51.0), 100.0);
        assert_eq!(axis(37.0, 6.0), (10.0, 40.0));
        assert!(axis(0.0, 6.0).1 > 0.0);
    }

    #[test]
    fn svg_has_one_polyline_per_series() {
        let mut t = Timeline::new(0);
        for s in 0..8u64 {
            for v in 1..=50u64 {
                t.record(s * S + 1, v * 100 * (s + 1));
            }
        }
        let svg = render_svg("chat <20 rooms>", "rate 100/s", &t.points(0));
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        for name in ["p50", "p90", "p99", "max"] {
            assert!(svg.contains(&format!(r#"class="{name}""#)));
        }
        assert!(svg.contains("chat &lt;20 rooms&gt;"));
        assert_eq!(svg.matches("<circle").count(), 4 * 8);
        // Balanced tags: every opened element is closed or self-closed.
        let opens = svg.matches('<').count();
        let closes = svg.matches("/>").count() + svg.matches("</").count() * 2;
        assert_eq!(opens, closes, "tags balanced");

        let empty = render_svg("x", "y", &[]);
        assert!(empty.starts_with("<svg ") && empty.contains("no samples"));
        assert_eq!(empty.matches("<polyline").count(), 4);
    }
}
