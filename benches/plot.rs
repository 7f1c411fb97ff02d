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
const GROUP_GAP: f64 = 22.0;
const CHART_H: f64 = 220.0;
const MARGIN_L: f64 = 64.0;
const MARGIN_TOP: f64 = 34.0;
const MARGIN_BOTTOM: f64 = 58.0;

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

/// A round axis maximum at or above `max`: 1, 2 or 5 times a power of ten.
fn nice_ceiling(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= max)
        .unwrap_or(10.0 * magnitude)
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
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

/// One bar chart at (x, y); returns its width.
fn chart(
    svg: &mut String,
    r: &Results,
    panel: &str,
    metric: fn(&Rounds) -> &[f64],
    title: &str,
    (x, y): (f64, f64),
) -> f64 {
    let groups = &r.groups[panel];
    let nv = r.variants.len() as f64;
    let group_w = nv * BAR + GROUP_GAP;
    let plot_w = (groups.len() as f64 * group_w).max(200.0);
    let highest = r
        .rounds
        .iter()
        .filter(|((p, _, _), _)| p == panel)
        .flat_map(|(_, rounds)| metric(rounds).iter().copied())
        .fold(0.0, f64::max);
    let top = nice_ceiling(highest);
    let (x0, y0) = (x + MARGIN_L, y + MARGIN_TOP);
    let scale = |v: f64| y0 + CHART_H - v / top * CHART_H;
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" font-size="13" font-weight="bold">{}</text>"#,
        x0,
        y + 18.0,
        escape(title)
    );
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let ty = scale(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0:.1}" x2="{:.1}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            x0 + plot_w,
            x0 - 4.0,
            ty + 3.0,
            short(v)
        );
    }
    for (gi, group) in groups.iter().enumerate() {
        let gx = x0 + GROUP_GAP / 2.0 + gi as f64 * group_w;
        for (vi, variant) in r.variants.iter().enumerate() {
            let key = (panel.to_string(), group.clone(), variant.clone());
            let Some(rounds) = r.rounds.get(&key) else {
                continue;
            };
            let (median, low, high) = spread(metric(rounds));
            let bx = gx + vi as f64 * BAR;
            let color = PALETTE[vi % PALETTE.len()];
            let _ = writeln!(
                svg,
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{} {}: median {median:.0}, {} rounds from {low:.0} to {high:.0}</title></rect>"#,
                scale(median),
                BAR - 2.0,
                (CHART_H - (scale(median) - y0)).max(0.0),
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
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" transform="rotate(-30 {:.1} {:.1})">{}</text>"#,
            gx + nv * BAR / 2.0,
            y0 + CHART_H + 14.0,
            gx + nv * BAR / 2.0,
            y0 + CHART_H + 14.0,
            escape(group)
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
    MARGIN_L + plot_w + 20.0
}

fn render(r: &Results, title: &str) -> String {
    let mut body = String::new();
    let row_h = MARGIN_TOP + CHART_H + MARGIN_BOTTOM;
    let mut width: f64 = 400.0;
    let legend_h = 44.0;
    for (pi, panel) in r.panels.iter().enumerate() {
        let y = legend_h + pi as f64 * row_h;
        let label = |what: &str| {
            if panel.is_empty() {
                what.to_string()
            } else {
                format!("{panel}: {what}")
            }
        };
        let w1 = chart(
            &mut body,
            r,
            panel,
            |x| &x.iops,
            &label("IOPS (median; whisker: lowest to highest round)"),
            (0.0, y),
        );
        let w2 = chart(
            &mut body,
            r,
            panel,
            |x| &x.p99_us,
            &label("p99 latency, µs"),
            (w1, y),
        );
        width = width.max(w1 + w2);
    }
    let mut legend = format!(
        r#"<text x="10" y="18" font-size="14" font-weight="bold">{}</text>"#,
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
