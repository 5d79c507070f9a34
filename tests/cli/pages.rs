//! The two pages whet makes, in headless Chromium where it is installed (SKIPPED otherwise):
//! the playground of `whet serve` streams both columns, and `whet compare`'s report.html
//! renders; screenshots of both, and no script error in the console. The playground's
//! screenshot is left in the temporary directory as whet-playground.png.

use super::{python, root, stderr, whet};
use std::path::Path;
use std::process::Command;

fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()));
    if found.is_none() {
        eprintln!("SKIPPED: no headless Chromium (apt-get install chromium)");
    }
    found
}

/// Load `url` in headless Chromium (scripts/check_page.py, the DevTools protocol over a pipe)
/// until `done` (a JavaScript expression) holds: the DOM then, and a screenshot in `png`.
/// Panics on a script error or a timeout.
fn load(url: &str, done: &str, png: &Path) -> String {
    let o = Command::new(python())
        .arg(root().join("scripts/check_page.py"))
        .args([url, png.to_str().unwrap(), done, "60"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("check_page.py said: {}", String::from_utf8_lossy(&o.stderr)));
    assert!(o.status.success(), "{url}: {}", v["errors"]);
    assert!(png.is_file(), "no screenshot of {url}");
    v["dom"].as_str().unwrap().to_string()
}

#[test]
fn the_playground_streams_two_models_side_by_side() {
    if chromium().is_none() {
        return;
    }
    let s = |p: &str| root().join(p).to_str().unwrap().to_string();
    let (base, regex) = (s("tests/fixtures/families/llama3"), s("tests/fixtures/adapters/regex"));
    let r = format!("r={regex}");
    let (mut child, url) =
        super::serve::serve(&["--model", &base, "--adapter", &r, "--model-id", "base"]);
    let tmp = tempfile::tempdir().unwrap();
    let page = format!("{url}/?message=hello&system=Be%20brief.&left=base&right=r&left_system=1&right_system=0&max_tokens=8&autorun=1");
    let done = "document.body.dataset.done == '1'";
    let dom = load(&page, done, &tmp.path().join("playground.png"));
    std::fs::copy(
        tmp.path().join("playground.png"),
        std::env::temp_dir().join("whet-playground.png"),
    )
    .ok();
    let _ = child.kill();
    assert!(dom.contains("data-done=\"1\""), "the page never finished streaming: {dom}");
    assert!(!dom.contains("out err"), "an error in a column: {dom}");
    let stats: Vec<&str> = dom
        .split("<div class=\"stats\">")
        .skip(1)
        .map(|s| &s[..s.find("</div>").unwrap()])
        .collect();
    assert_eq!(stats.len(), 2);
    for s in stats {
        assert!(
            s.contains("prompt tokens") && s.contains(" tokens/s") && s.contains("8 tokens"),
            "{s}"
        );
    }
}

#[test]
fn the_compare_report_renders() {
    if chromium().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let line = |i: usize| {
        format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"q{i}\"}}, {{\"role\": \"assistant\", \"content\": \"{}\"}}]}}\n", ["yes", "no"][i % 2])
    };
    for (split, n) in [("train", 6), ("valid", 2), ("test", 4)] {
        std::fs::write(data.join(format!("{split}.jsonl")), (0..n).map(line).collect::<String>())
            .unwrap();
    }
    let out = tmp.path().join("report");
    let o = whet(
        &[
            "compare",
            "--model",
            &root().join("tests/fixtures/families/llama3").to_string_lossy(),
            "--adapter",
            &root().join("tests/fixtures/adapters/regex").to_string_lossy(),
            "--data",
            data.to_str().unwrap(),
            "--shots",
            "0,1",
            "--seeds",
            "2",
            "--max-tokens",
            "2",
            "--latency-samples",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let url = format!("file://{}", out.join("report.html").display());
    let dom = load(&url, "document.readyState == 'complete'", &tmp.path().join("report.png"));
    assert!(dom.contains("Verdict") && dom.contains("<svg") && dom.contains("fine-tuned"), "{dom}");
}
