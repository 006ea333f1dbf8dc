//! The results as a Markdown table, the targets checked against them, and two SVG plots
//! (goodput, upstream bytes per message, per link condition).
//!
//! Pure formatting over [`Figures`]; the only I/O is writing the SVG files. Ratios are
//! always edgerelay's figure over the bridge's from the same run.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::cases::Figures;
use crate::edge::System;
use crate::workload::Kind;

fn ms(v: Option<u64>, grace_s: u64) -> String {
    match v {
        Some(ms) => format!("{ms}"),
        None => format!("> {} s", grace_s),
    }
}

/// The table, one row per case, and the outage figures.
pub fn table(figures: &[Figures], grace_s: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | link | system | offered msg/s | goodput msg/s | up B/msg | down B/msg | latency p50 / p99 ms | CPU-s / 100k msgs | peak RSS MiB |"
    );
    let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---|---:|---:|");
    for f in figures {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {} / {} | {:.2} | {:.1} |",
            f.kind.name(),
            f.link,
            f.system.name(),
            f.offered,
            f.goodput,
            f.up_bytes_per_msg,
            f.down_bytes_per_msg,
            ms(f.p50_ms, grace_s),
            ms(f.p99_ms, grace_s),
            f.cpu_per_100k,
            f.peak_rss_mib
        );
    }
    if let Some(f) = figures
        .iter()
        .max_by(|a, b| a.loadgen_cores.total_cmp(&b.loadgen_cores))
        .filter(|f| f.loadgen_cores > 0.0)
    {
        let _ = writeln!(
            s,
            "\nLoad generator: at most {:.0} % of one core ({} / {}, {:.0} msg/s offered).",
            f.loadgen_cores * 100.0,
            f.kind.name(),
            f.link,
            f.offered
        );
    }
    let outages: Vec<_> = figures
        .iter()
        .filter_map(|f| f.outage.map(|o| (f, o)))
        .collect();
    if !outages.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| workload | system | acknowledged by the edge | lost | duplicated at the consumer | backlog drained in s | drain msg/s |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|");
        for (f, o) in outages {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.1} | {:.0} |",
                f.kind.name(),
                f.system.name(),
                o.acked,
                o.lost,
                o.duplicated,
                o.drain_s,
                f.goodput
            );
        }
    }
    s
}

/// Pairs (bridge, edgerelay) of the same workload and link.
fn pairs(figures: &[Figures]) -> Vec<(&Figures, &Figures)> {
    figures
        .iter()
        .filter(|f| f.system == System::Bridge)
        .filter_map(|b| {
            figures
                .iter()
                .find(|r| r.system == System::Relay && r.kind == b.kind && r.link == b.link)
                .map(|r| (b, r))
        })
        .collect()
}

/// One line per target and case: the ratio and whether it is met.
pub fn targets(figures: &[Figures], goodput_link: &str) -> String {
    let mut s = String::new();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for (b, r) in pairs(figures) {
        let case = format!("{} / {}", r.kind.name(), r.link);
        if r.outage.is_none() {
            let bytes = r.up_bytes_per_msg / b.up_bytes_per_msg.max(1e-9);
            let _ = writeln!(
                s,
                "- upstream bytes/msg, {case}: edgerelay/bridge = 1/{:.1} (target ≤ 1/9): {}",
                1.0 / bytes.max(1e-9),
                verdict(bytes <= 1.0 / 9.0)
            );
            let cpu = r.cpu_per_100k / b.cpu_per_100k.max(1e-9);
            let _ = writeln!(
                s,
                "- CPU per message, {case}: edgerelay/bridge = {:.2} (target ≤ 0.33): {}",
                cpu,
                verdict(cpu <= 1.0 / 3.0)
            );
        }
        if r.link == goodput_link {
            let g = r.goodput / b.goodput.max(1e-9);
            let _ = writeln!(
                s,
                "- goodput, {case}: edgerelay/bridge = {g:.1}× (target ≥ 8×): {}",
                verdict(g >= 8.0)
            );
        }
        if let (Some(ro), Some(bo)) = (r.outage, b.outage) {
            let _ = writeln!(
                s,
                "- lost after SIGKILL during the outage, {}: edgerelay {} of {} acknowledged, bridge {} of {} (target: edgerelay 0): {}",
                r.kind.name(),
                ro.lost,
                ro.acked,
                bo.lost,
                bo.acked,
                verdict(ro.lost == 0)
            );
        }
    }
    s
}

fn colour(j: usize) -> RGBColor {
    if j == 0 {
        RGBColor(200, 120, 60)
    } else {
        RGBColor(60, 110, 180)
    }
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Grouped bars per link condition (log scale), one panel per workload.
pub fn plot(
    path: &Path,
    title: &str,
    figures: &[Figures],
    value: fn(&Figures) -> f64,
) -> PlotResult {
    let root = SVGBackend::new(path, (1000, 430)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(36);
    top.titled(title, ("sans-serif", 20))?;
    // The legend, once, in the title strip's right-hand corner.
    for (j, system) in [System::Bridge, System::Relay].into_iter().enumerate() {
        let y = 6 + 14 * j as i32;
        top.draw(&Rectangle::new(
            [(850, y), (860, y + 10)],
            colour(j).filled(),
        ))?;
        top.draw(&Text::new(system.name(), (866, y - 1), ("sans-serif", 12)))?;
    }
    let kinds = [Kind::Telemetry, Kind::Logs];
    for (panel, kind) in body.split_evenly((1, 2)).iter().zip(kinds) {
        let rows: Vec<&Figures> = figures.iter().filter(|f| f.kind == kind).collect();
        let mut links: Vec<&str> = Vec::new();
        for f in &rows {
            if !links.contains(&f.link.as_str()) {
                links.push(&f.link);
            }
        }
        if links.is_empty() {
            continue;
        }
        let max = rows.iter().map(|f| value(f)).fold(1.0, f64::max);
        let n = links.len() as f64;
        // Short axis labels: "1 Mbit/s, 150 ms, 3 %" → "1M/150ms/3%".
        let names: Vec<String> = links
            .iter()
            .map(|l| {
                l.replace(" Mbit/s", "M")
                    .replace(" kbit/s", "k")
                    .replace(", ", "/")
                    .replace(" ms", "ms")
                    .replace(" %", "%")
            })
            .collect();
        let label = move |x: &f64| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        };
        let caption = format!("{} workload", kind.name());
        // Log scale: the ratios between the systems are what the plots are for.
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n, (1f64..max * 3.0).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(links.len() * 2 + 1)
            .x_label_formatter(&label)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (i, link) in links.iter().enumerate() {
            for (j, system) in [System::Bridge, System::Relay].into_iter().enumerate() {
                let Some(f) = rows.iter().find(|f| f.link == *link && f.system == system) else {
                    continue;
                };
                let (x0, x1) = (
                    i as f64 + 0.1 + 0.4 * j as f64,
                    i as f64 + 0.48 + 0.4 * j as f64,
                );
                let v = value(f).max(1.0);
                chart.draw_series([Rectangle::new([(x0, 1.0), (x1, v)], colour(j).filled())])?;
                chart.draw_series([Text::new(
                    if value(f) < 100.0 {
                        format!("{:.1}", value(f))
                    } else {
                        format!("{:.0}", value(f))
                    },
                    (x0, v * 1.25),
                    ("sans-serif", 11),
                )])?;
            }
        }
    }
    root.present()?;
    Ok(())
}
