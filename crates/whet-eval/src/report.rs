//! Reports of a comparison: the terminal table, `report.md`, `report.json`, and `report.html`
//! — one self-contained page with the tables and inline SVG plots (metric with its interval
//! per arm, latency), the plots also as SVG files. Written into a fresh directory beside
//! `--out` and moved into place, so a failure leaves nothing half-written.

use crate::compare::Report;
use crate::Error;
use std::fmt::Write as _;
use std::path::Path;

fn opt(v: Option<f64>, scale: f64, unit: &str) -> String {
    v.map_or("–".into(), |x| format!("{:.0}{unit}", x * scale))
}

/// The table of arms: metric with interval, consistency, prompt tokens, latency, cost.
pub fn table(r: &Report) -> String {
    let m = r.primary();
    let mut rows = vec![[
        "arm".to_string(),
        format!("{m} [95% CI]"),
        "consistency (seeds / groups)".into(),
        "prompt tok/query".into(),
        "latency p50/p95 ms".into(),
        "first token p50 ms".into(),
        "cost / 1M queries".into(),
    ]];
    for a in &r.arms {
        let e = &a.result.metrics[m];
        let c = &a.result.consistency;
        rows.push([
            format!("{}{}", a.name, if a.chosen { " *" } else { "" }),
            format!("{:.3} [{:.3}, {:.3}]", e.mean, e.ci95[0], e.ci95[1]),
            format!("{} / {}", opt(c.seeds, 100.0, "%"), opt(c.groups, 100.0, "%")),
            format!("{:.0}", a.result.prompt_tokens_per_query),
            format!("{:.0} / {:.0}", a.result.latency_ms.total_p50, a.result.latency_ms.total_p95),
            format!("{:.0}", a.result.latency_ms.ttft_p50),
            match a.cost_per_1m_queries {
                Some(c) => format!("{c:.2}"),
                None => format!("{:.1} machine-h", a.machine_hours_per_1m_queries),
            },
        ]);
    }
    let widths: Vec<usize> =
        (0..7).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if n == 0 {
            let _ = writeln!(
                out,
                "{}",
                widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  ")
            );
        }
    }
    for a in &r.arms {
        if let Some(d) = &a.draws {
            let _ = writeln!(
                out,
                "{}: {} draws of the shots on validation, {m} {:.3} on average [{:.3} to {:.3}]; the best (seed {}) ran on the test set",
                a.name,
                d.scores.len(),
                d.mean,
                d.range[0],
                d.range[1],
                d.chosen_seed
            );
        }
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Horizontal bars with whiskers: one row per (label, value, interval), values in 0..=max.
fn bars_svg(title: &str, rows: &[(String, f64, Option<[f64; 2]>)], max: f64, unit: &str) -> String {
    let (w, left, row_h) = (640.0, 220.0, 28.0);
    let h = 40.0 + row_h * rows.len() as f64;
    let x = |v: f64| left + (w - left - 60.0) * (v / max.max(1e-12)).clamp(0.0, 1.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\
         <text x=\"10\" y=\"18\" font-size=\"14\">{}</text>",
        esc(title)
    );
    for (i, (label, v, ci)) in rows.iter().enumerate() {
        let y = 30.0 + row_h * i as f64;
        let _ = write!(
            s,
            "<text x=\"10\" y=\"{:.1}\">{}</text><rect x=\"{left}\" y=\"{:.1}\" width=\"{:.1}\" height=\"16\" fill=\"#5b7f5e\"/>",
            y + 13.0,
            esc(label),
            y + 2.0,
            (x(*v) - left).max(0.5)
        );
        if let Some([lo, hi]) = ci {
            let _ = write!(
                s,
                "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#222\" stroke-width=\"1.5\"/>",
                x(*lo),
                x(*hi),
                y + 10.0,
                y + 10.0
            );
        }
        // Milliseconds whole, scores to three places.
        let digits = if unit.is_empty() { 3 } else { 0 };
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\">{v:.digits$}{unit}</text>",
            x(*v) + 6.0,
            y + 13.0
        );
    }
    s.push_str("</svg>");
    s
}

/// The metric per arm, with its interval.
pub fn metric_svg(r: &Report) -> String {
    let m = r.primary();
    let rows: Vec<_> = r
        .arms
        .iter()
        .map(|a| {
            let e = &a.result.metrics[m];
            (a.name.clone(), e.mean, Some(e.ci95))
        })
        .collect();
    let max = rows
        .iter()
        .filter_map(|(_, _, c)| c.map(|c| c[1]))
        .fold(0.0f64, f64::max)
        .max(if m == "chrf" { 100.0 } else { 1.0 });
    bars_svg(&format!("{m} per arm (bars: mean; lines: 95% bootstrap interval)"), &rows, max, "")
}

/// Median latency per arm.
pub fn latency_svg(r: &Report) -> String {
    let rows: Vec<_> = r
        .arms
        .iter()
        .map(|a| {
            (
                a.name.clone(),
                a.result.latency_ms.total_p50,
                Some([a.result.latency_ms.ttft_p50, a.result.latency_ms.total_p95]),
            )
        })
        .collect();
    let max = rows.iter().filter_map(|(_, _, c)| c.map(|c| c[1])).fold(1.0f64, f64::max);
    bars_svg(
        "latency per answer, ms (bar: median; line: first-token median to p95)",
        &rows,
        max,
        " ms",
    )
}

/// The learning curve: metric (with intervals) against training examples, the best prompted
/// arm as a horizontal line.
pub fn curve_svg(r: &Report) -> Option<String> {
    let c = r.learning_curve.as_ref()?;
    let (w, h, l, b, t) = (640.0, 340.0, 60.0, 40.0, 30.0);
    let max_n = c.points.iter().map(|(n, _)| *n).max().unwrap_or(1).max(1) as f64;
    let max_y = c
        .points
        .iter()
        .map(|(_, e)| e.ci95[1])
        .chain([c.prompted.ci95[1]])
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let x = |n: f64| l + (w - l - 20.0) * n / max_n;
    let y = |v: f64| h - b - (h - b - t) * (v / max_y).clamp(0.0, 1.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\
        <text x=\"10\" y=\"18\" font-size=\"14\">{} against training examples (line: {})</text>\
        <line x1=\"{l}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#999\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{:.1}\" stroke=\"#999\"/>",
        esc(r.primary()), esc(&c.prompted_name), h - b, w - 20.0, h - b, h - b);
    let _ = write!(s, "<line x1=\"{l}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#b55\" stroke-dasharray=\"6 4\"/>", w - 20.0, y(c.prompted.mean), y(c.prompted.mean));
    let path: Vec<String> =
        c.points.iter().map(|(n, e)| format!("{:.1},{:.1}", x(*n as f64), y(e.mean))).collect();
    let _ = write!(
        s,
        "<polyline fill=\"none\" stroke=\"#5b7f5e\" stroke-width=\"2\" points=\"{}\"/>",
        path.join(" ")
    );
    for (n, e) in &c.points {
        let px = x(*n as f64);
        let _ = write!(s, "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#222\"/><circle cx=\"{px:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#5b7f5e\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{n}</text>",
            y(e.ci95[0]), y(e.ci95[1]), y(e.mean), h - b + 16.0);
    }
    let _ = write!(
        s,
        "<text x=\"{l}\" y=\"{:.1}\">0</text><text x=\"4\" y=\"{:.1}\">{:.2}</text></svg>",
        h - 6.0,
        t + 4.0,
        max_y
    );
    Some(s)
}

/// `report.md`.
pub fn markdown(r: &Report) -> String {
    let mut s = String::from("# whet compare\n\n");
    let _ = writeln!(s, "**Verdict.** {}\n", r.verdict);
    let _ = writeln!(s, "```text\n{}```\n", table(r));
    let _ = writeln!(s, "`*`: the prompted arm chosen on the validation set. Consistency: agreement of answers across sampled runs (seeds) and across paraphrases (groups).\n");
    let _ = writeln!(
        s,
        "## Every metric\n\n| arm | {} | reference loss | perplexity |\n|---|{}---|---|",
        r.settings["metrics"]
            .as_array()
            .map(|m| m.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" | "))
            .unwrap_or_default(),
        "---|".repeat(r.settings["metrics"].as_array().map_or(1, Vec::len).saturating_sub(1))
    );
    for a in &r.arms {
        let cells: Vec<String> = a
            .result
            .metrics
            .values()
            .map(|e| format!("{:.3} [{:.3}, {:.3}]", e.mean, e.ci95[0], e.ci95[1]))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            a.name,
            cells.join(" | "),
            a.result.reference_loss.map_or("–".into(), |l| format!("{l:.3}")),
            a.result.perplexity.map_or("–".into(), |p| format!("{p:.2}"))
        );
    }
    if let Some(t) = &r.training {
        let _ = writeln!(
            s,
            "\n## Training cost\n\n{} steps, {} tokens, {:.0} s of training steps.",
            t.steps, t.tokens, t.seconds
        );
    }
    for w in &r.warnings {
        let _ = writeln!(s, "\n> warning: {w}");
    }
    let _ = writeln!(
        s,
        "\n## Settings\n\n```json\n{}\n```",
        serde_json::to_string_pretty(&r.settings).unwrap_or_default()
    );
    s
}

/// `report.html`: self-contained, no script, nothing fetched.
pub fn html(r: &Report) -> String {
    let mut s = String::from("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>whet compare</title>\
        <style>body{font:15px/1.45 system-ui,sans-serif;max-width:980px;margin:24px auto;padding:0 16px;color:#222}\
        table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-variant-numeric:tabular-nums}\
        th{background:#eef0ea}.verdict{background:#f4f6ef;border-left:4px solid #5b7f5e;padding:8px 12px}</style></head><body>\
        <h1>whet compare</h1>");
    let _ = write!(s, "<p class=\"verdict\"><b>Verdict.</b> {}</p>", esc(&r.verdict));
    let m = r.primary();
    let _ = write!(s, "<table><tr><th>arm</th><th>kind</th><th>{} [95% CI]</th><th>consistency seeds</th><th>consistency groups</th><th>prompt tokens / query</th><th>latency p50 / p95 ms</th><th>first token p50 ms</th><th>tokens/s</th><th>cost / 1M queries</th></tr>", esc(m));
    for a in &r.arms {
        let e = &a.result.metrics[m];
        let l = &a.result.latency_ms;
        let _ = write!(
            s,
            "<tr><td>{}{}</td><td>{}</td><td>{:.3} [{:.3}, {:.3}]</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.0} / {:.0}</td><td>{:.0}</td><td>{:.1}</td><td>{}</td></tr>",
            esc(&a.name), if a.chosen { " *" } else { "" }, a.kind, e.mean, e.ci95[0], e.ci95[1],
            opt(a.result.consistency.seeds, 100.0, "%"), opt(a.result.consistency.groups, 100.0, "%"),
            a.result.prompt_tokens_per_query, l.total_p50, l.total_p95, l.ttft_p50, l.tokens_per_sec,
            a.cost_per_1m_queries.map_or(format!("{:.1} machine-h", a.machine_hours_per_1m_queries), |c| format!("{c:.2}")),
        );
    }
    s.push_str("</table><p>* the prompted arm chosen on the validation set.</p>");
    let _ = write!(s, "<h2>{}</h2>{}<h2>Latency</h2>{}", esc(m), metric_svg(r), latency_svg(r));
    if let (Some(svg), Some(c)) = (curve_svg(r), &r.learning_curve) {
        let _ = write!(
            s,
            "<h2>Learning curve</h2>{svg}<p>{}</p>",
            match c.crosses_at {
                Some(n) =>
                    format!("Fine-tuning passes the best prompt from {n} training examples."),
                None => "No adapter of the curve passes the best prompt.".into(),
            }
        );
    }
    if let Some(t) = &r.training {
        let _ = write!(
            s,
            "<h2>Training cost</h2><p>{} steps, {} tokens, {:.0} s.</p>",
            t.steps, t.tokens, t.seconds
        );
    }
    for w in &r.warnings {
        let _ = write!(s, "<p><b>warning:</b> {}</p>", esc(w));
    }
    let _ = write!(
        s,
        "<h2>Settings</h2><pre>{}</pre></body></html>",
        esc(&serde_json::to_string_pretty(&r.settings).unwrap_or_default())
    );
    s
}

/// Write every report file into the directory `out` (created if needed). The CLI hands it a
/// fresh staging directory that replaces `--out` only when complete (whet-cli's `output`).
pub fn write(r: &Report, out: &Path) -> Result<(), Error> {
    let io = |path: &Path, e: std::io::Error| Error::Io { path: path.to_path_buf(), source: e };
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut files = vec![
        ("report.json", serde_json::to_string_pretty(r).unwrap_or_default()),
        ("report.md", markdown(r)),
        ("report.html", html(r)),
        ("metric.svg", metric_svg(r)),
        ("latency.svg", latency_svg(r)),
    ];
    if let Some(svg) = curve_svg(r) {
        files.push(("learning-curve.svg", svg));
    }
    for (name, text) in files {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| io(&p, e))?;
    }
    Ok(())
}
