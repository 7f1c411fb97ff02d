//! Turn a bench script's results (JSON lines) into an SVG a reader can look at: per panel
//! (target), one bar chart of IOPS and one of p99 latency, a group of bars per workload and a
//! bar per variant (daemon). Each bar is the median over its rounds, with a whisker from the
//! lowest to the highest round, since on a noisy machine the spread matters as much as the
//! median.
//!
//!     plot --input results.jsonl --output results.svg --title "compare.sh, 3 rounds x 3 s"
//!
//! Each input line is an object with `group` and `variant` (strings), `iops` and `p99_us`
//! (numbers) and optionally `panel` (a string). Lines without numbers (failed runs) are
//! skipped. The SVG is written by hand: text is left to the viewer's fonts, so nothing here
//! depends on a font library.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;

const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];
const BAR: f64 = 16.0;
const CHART_H: f64 = 120.0;
const MARGIN_L: f64 = 40.0;
const MARGIN_TOP: f64 = 22.0;

#[derive(Default)]
struct Rounds {
    iops: Vec<f64>,
    p99_us: Vec<f64>,
}

/// Panels, groups and variants in the order they first appear.
#[derive(Default)]
struct Results {
    panels: Vec<String>,
    groups: BTreeMap<String, Vec<String>>,
    variants: Vec<String>,
    rounds: BTreeMap<(String, String, String), Rounds>,
}

fn push_new(list: &mut Vec<String>, item: &str) {
    if !list.iter().any(|x| x == item) {
        list.push(item.to_string());
    }
}

impl Results {
    fn parse(text: &str) -> Result<Results, String> {
        let mut r = Results::default();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
            let text_of = |k: &str| v[k].as_str().map(str::to_string);
            let (Some(group), Some(variant)) = (text_of("group"), text_of("variant")) else {
                return Err(format!(
                    "line {}: needs string fields group and variant",
                    n + 1
                ));
            };
            let (Some(iops), Some(p99)) = (v["iops"].as_f64(), v["p99_us"].as_f64()) else {
                continue;
            };
            let panel = text_of("panel").unwrap_or_default();
            push_new(&mut r.panels, &panel);
            push_new(r.groups.entry(panel.clone()).or_default(), &group);
            push_new(&mut r.variants, &variant);
            let rounds = r.rounds.entry((panel, group, variant)).or_default();
            rounds.iops.push(iops);
            rounds.p99_us.push(p99);
        }
        if r.rounds.is_empty() {
            return Err("no result with iops and p99_us".into());
        }
        Ok(r)
    }
}

/// (median, lowest, highest).
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

/// Axis ticks for values up to `max`: a round step (1, 2, 2.5 or 5 times a power of ten)
/// giving about four intervals, and the top tick.
fn axis(max: f64) -> (f64, f64) {
    if max <= 0.0 {
        return (0.25, 1.0);
    }
    let raw = max / 4.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= raw)
        .unwrap_or(10.0 * magnitude);
    (step, (max / step).ceil() * step)
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3).replace(".0k", "k")
    } else {
        format!("{v:.0}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One small bar chart of `metric` for one panel and group, a bar per variant, at (x, y).
#[allow(clippy::too_many_arguments)]
fn chart(
    svg: &mut String,
    r: &Results,
    panel: &str,
    group: &str,
    metric: fn(&Rounds) -> &[f64],
    title: &str,
    (x, y): (f64, f64),
) {
    let plot_w = r.variants.len() as f64 * BAR + 8.0;
    let highest = r
        .variants
        .iter()
        .filter_map(|v| {
            r.rounds
                .get(&(panel.to_string(), group.to_string(), v.clone()))
        })
        .flat_map(|rounds| metric(rounds).iter().copied())
        .fold(0.0, f64::max);
    let (step, top) = axis(highest);
    let (x0, y0) = (x + MARGIN_L, y + MARGIN_TOP);
    let scale = |v: f64| y0 + CHART_H - v / top * CHART_H;
    let _ = writeln!(
        svg,
        r#"<text x="{x0:.1}" y="{:.1}" font-size="11">{}</text>"#,
        y0 - 8.0,
        escape(title)
    );
    let mut tick = 0.0;
    while tick <= top * 1.0001 {
        let ty = scale(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0:.1}" x2="{:.1}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="9" text-anchor="end">{}</text>"##,
            x0 + plot_w,
            x0 - 4.0,
            ty + 3.0,
            short(tick)
        );
        tick += step;
    }
    for (vi, variant) in r.variants.iter().enumerate() {
        let Some(rounds) = r
            .rounds
            .get(&(panel.to_string(), group.to_string(), variant.clone()))
        else {
            continue;
        };
        let (median, low, high) = spread(metric(rounds));
        let bx = x0 + 4.0 + vi as f64 * BAR;
        let color = PALETTE[vi % PALETTE.len()];
        let _ = writeln!(
            svg,
            r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{} {}: median {median:.0}, {} rounds from {low:.0} to {high:.0}</title></rect>"#,
            scale(median),
            BAR - 2.0,
            (y0 + CHART_H - scale(median)).max(0.0),
            escape(group),
            escape(variant),
            metric(rounds).len()
        );
        let cx = bx + (BAR - 2.0) / 2.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{cx:.1}" x2="{cx:.1}" y1="{:.1}" y2="{:.1}" stroke="#333"/><text x="{cx:.1}" y="{:.1}" font-size="8" text-anchor="middle">{}</text>"##,
            scale(low),
            scale(high),
            scale(high) - 3.0,
            short(median)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{x0:.1}" x2="{x0:.1}" y1="{y0:.1}" y2="{:.1}" stroke="#333"/><line x1="{x0:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        y0 + CHART_H,
        x0 + plot_w,
        y0 + CHART_H,
        y0 + CHART_H
    );
}

/// Small multiples: a row per panel, a column per group (its own scales, so a 128 KiB
/// workload's IOPS are not flattened by a 4 KiB one's), IOPS above p99.
fn render(r: &Results, title: &str) -> String {
    let cell_w = (MARGIN_L + r.variants.len() as f64 * BAR + 8.0 + 16.0).max(180.0);
    let chart_h = MARGIN_TOP + CHART_H + 14.0;
    let row_h = 22.0 + 2.0 * chart_h;
    let legend_h = 58.0;
    let columns = r.groups.values().map(Vec::len).max().unwrap_or(1);
    let mut body = String::new();
    for (pi, panel) in r.panels.iter().enumerate() {
        let y = legend_h + pi as f64 * row_h;
        if !panel.is_empty() {
            let _ = writeln!(
                body,
                r#"<text x="10" y="{:.1}" font-size="13" font-weight="bold">{}</text>"#,
                y + 14.0,
                escape(panel)
            );
        }
        for (gi, group) in r.groups[panel].iter().enumerate() {
            let x = gi as f64 * cell_w;
            let iops_title = format!("{group} IOPS");
            chart(
                &mut body,
                r,
                panel,
                group,
                |x| &x.iops,
                &iops_title,
                (x, y + 22.0),
            );
            chart(
                &mut body,
                r,
                panel,
                group,
                |x| &x.p99_us,
                "p99 latency, µs",
                (x, y + 22.0 + chart_h),
            );
        }
    }
    let mut legend = format!(
        r#"<text x="10" y="18" font-size="14" font-weight="bold">{}</text><text x="10" y="50" font-size="10">bars: median over rounds; whiskers: lowest to highest round; hover a bar for its numbers</text>"#,
        escape(title)
    );
    let mut lx = 10.0;
    for (vi, variant) in r.variants.iter().enumerate() {
        let _ = write!(
            legend,
            r#"<rect x="{lx:.1}" y="26" width="10" height="10" fill="{}"/><text x="{:.1}" y="35" font-size="11">{}</text>"#,
            PALETTE[vi % PALETTE.len()],
            lx + 14.0,
            escape(variant)
        );
        lx += 24.0 + 7.0 * variant.chars().count() as f64;
    }
    let width = (columns as f64 * cell_w).max(lx).max(520.0);
    let height = legend_h + r.panels.len() as f64 * row_h;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{legend}\n{body}</svg>\n"
    )
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut input, mut output, mut title) = (None, None, String::from("guardblk bench"));
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--input" => input = Some(value()?),
            "--output" => output = Some(value()?),
            "--title" => title = value()?,
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            _ => {
                return Err(format!(
                    "unknown argument {a}; usage: plot --input FILE --output FILE.svg [--title T]"
                ))
            }
        }
    }
    if input.is_none() && output.is_none() {
        // `cargo bench` runs every bench target with just --bench: nothing to plot then.
        eprintln!("plot: nothing to do without --input and --output (the bench scripts call it)");
        return Ok(());
    }
    let (Some(input), Some(output)) = (input, output) else {
        return Err("usage: plot --input results.jsonl --output results.svg [--title T]".into());
    };
    let text = std::fs::read_to_string(&input).map_err(|e| format!("cannot read {input}: {e}"))?;
    let results = Results::parse(&text).map_err(|e| format!("{input}: {e}"))?;
    std::fs::write(&output, render(&results, &title))
        .map_err(|e| format!("cannot write {output}: {e}"))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plot: {e}");
            ExitCode::FAILURE
        }
    }
}
