//! `whet generate --batch-file` and `whet serve` as a user runs them: the binary, its output,
//! a soak over loopback, Ctrl-C.

use super::{assert_one_line_error, root, stderr, stdout, whet};
use serde_json::{json, Value};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixture() -> (String, String, String) {
    let s = |p: &str| root().join(p).to_str().unwrap().to_string();
    (
        s("tests/fixtures/families/llama3"),
        s("tests/fixtures/adapters/regex"),
        s("tests/fixtures/adapters/layers"),
    )
}

#[test]
fn batch_file_lines_generate_what_generate_gives_one_at_a_time() {
    let (base, regex, layers) = fixture();
    let alone = |adapter: Option<&str>| {
        let mut args = vec!["generate", "--model", &base, "--prompt", "ab", "--max-tokens", "8"];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        let o = whet(&args, "");
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o).trim_end_matches('\n').to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"ab\"}\n{\"id\": \"x\", \"prompt\": \"ab\", \"adapter\": \"r\"}\n\n\
         {\"prompt\": \"ab\", \"adapter\": \"none\", \"max_tokens\": 3}\n{\"prompt\": \"ab\", \"adapter\": \"l\"}\n",
    )
    .unwrap();
    let (r, l) = (format!("r={regex}"), format!("l={layers}"));
    let o = whet(
        &[
            "generate",
            "--model",
            &base,
            "--max-tokens",
            "8",
            "--adapter",
            &r,
            "--adapter",
            &l,
            "--batch-file",
            file.to_str().unwrap(),
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    let both = {
        let o = whet(
            &[
                "generate",
                "--model",
                &base,
                "--prompt",
                "ab",
                "--max-tokens",
                "8",
                "--adapter",
                &r,
                "--adapter",
                &l,
            ],
            "",
        );
        stdout(&o).trim_end_matches('\n').to_string()
    };
    // No `adapter` field: the adapters the command line gave, as `whet generate` applies them.
    assert_eq!(lines[0]["text"], both);
    assert_eq!(lines[1]["text"], alone(Some(&regex)));
    assert_eq!(lines[1]["id"], "x");
    assert_eq!(lines[2]["completion_tokens"], 3);
    assert!(alone(None).starts_with(lines[2]["text"].as_str().unwrap()));
    assert_eq!(lines[3]["text"], alone(Some(&layers)));
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        assert!(l["prompt_tokens"].as_u64().unwrap() > 0);
    }
}

#[test]
fn bad_batch_lines_are_refused_naming_the_line() {
    let (base, regex, _) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.jsonl");
    let run = |content: &str, extra: &[&str]| {
        std::fs::write(&file, content).unwrap();
        let mut args = vec!["generate", "--model", &base, "--batch-file", file.to_str().unwrap()];
        args.extend(extra);
        assert_one_line_error(&whet(&args, ""))
    };
    let e = run("{\"prompt\": \"a\"}\n{\"promt\": \"b\"}\n", &[]);
    assert!(e.contains("p.jsonl:2: unknown field `promt`"), "{e}");
    let e = run("{\"prompt\": \"a\", \"messages\": []}\n", &[]);
    assert!(e.contains("p.jsonl:1: give exactly one of `prompt` and `messages`"), "{e}");
    let e = run("{\"prompt\": \"a\", \"top_p\": 2}\n", &[]);
    assert!(e.contains("p.jsonl:1: `top_p` must be in (0, 1], got `2`"), "{e}");
    let r = format!("r={regex}");
    let e = run("{\"prompt\": \"a\", \"adapter\": \"q\"}\n", &["--adapter", &r]);
    assert!(e.contains("p.jsonl:1: `adapter`: no adapter named `q`; given: r"), "{e}");
    let e = run("\n", &[]);
    assert!(e.contains("no prompts"), "{e}");
}

/// `whet serve` on a free port; the address it printed.
pub fn serve(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_whet"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("whet serve printed its address").unwrap();
        if let Some(at) = line.find("http://") {
            let rest = &line[at..];
            break rest[..rest.find("/ ").unwrap()].to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn interrupt(child: &mut Child) -> std::process::ExitStatus {
    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "whet serve ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A bounded soak: 600 requests, 8 at a time, over three models; a tenth malformed, a tenth
/// streamed and dropped after the first chunk. Every good request is answered, the server
/// never falls over, its resident memory stays flat after warm-up, and Ctrl-C stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_soak_then_ctrl_c() {
    let (base, regex, layers) = fixture();
    let (r, l) = (format!("r={regex}"), format!("l={layers}"));
    let (mut child, url) = serve(&[
        "--model",
        &base,
        "--adapter",
        &r,
        "--adapter",
        &l,
        "--model-id",
        "base",
        "--max-tokens",
        "16",
    ]);
    let http = reqwest::Client::new();
    let one = |i: usize| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let model = ["base", "r", "l"][i % 3];
            let good = json!({"model": model, "messages": [{"role": "user", "content": format!("q{i}")}],
                              "max_tokens": 8, "temperature": 0});
            match i % 10 {
                0 => {
                    let bad = [
                        "{\"model\": ",
                        "{\"model\": \"zzz\", \"messages\": []}",
                        "[1, 2]",
                        "{\"model\": \"base\", \"messages\": [], \"max_tokens\": 99}",
                    ][i / 10 % 4];
                    let r = http
                        .post(format!("{url}/v1/chat/completions"))
                        .body(bad)
                        .header("content-type", "application/json")
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap();
                    assert!(matches!(status, 400 | 404 | 422), "{bad} -> {status}");
                    assert!(body["error"]["message"].is_string());
                    "bad"
                }
                5 => {
                    let mut s = good.clone();
                    s["stream"] = json!(true);
                    s["max_tokens"] = json!(16);
                    let mut r = http
                        .post(format!("{url}/v1/chat/completions"))
                        .json(&s)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.chunk().await.unwrap();
                    "cancelled" // dropped here, mid-stream
                }
                _ => {
                    let r = http
                        .post(format!("{url}/v1/chat/completions"))
                        .json(&good)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    let body: Value = r.json().await.unwrap();
                    assert!(body["choices"][0]["message"]["content"].is_string(), "{body}");
                    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() <= 8);
                    "good"
                }
            }
        }
    };
    let run = |range: std::ops::Range<usize>| {
        let one = &one;
        async move {
            let mut kinds = vec![];
            for chunk in range.collect::<Vec<_>>().chunks(8) {
                kinds.extend(futures_util::future::join_all(chunk.iter().map(|&i| one(i))).await);
            }
            kinds
        }
    };
    let start = Instant::now();
    let warm = run(0..200).await;
    let rss_warm = rss_kib(child.id());
    let mid = run(200..400).await;
    let rss_mid = rss_kib(child.id());
    let rest = run(400..600).await;
    let rss_end = rss_kib(child.id());
    let all: Vec<&str> = warm.into_iter().chain(mid).chain(rest).collect();
    let count = |k| all.iter().filter(|&&x| x == k).count();
    eprintln!(
        "soak: {} good, {} malformed, {} cancelled in {:.1} s; RSS {rss_warm} KiB after warm-up, {rss_mid} KiB after 400, {rss_end} KiB at the end",
        count("good"), count("bad"), count("cancelled"), start.elapsed().as_secs_f64()
    );
    assert_eq!(count("good"), 480);
    // A leak grows with every request; allocator arenas that more threads warm up grow once.
    // Over the last 200 requests (15 KiB a request would show), RSS stays within 5% of the
    // warmed-up size.
    assert!(
        (rss_end as f64 - rss_mid as f64) <= rss_warm as f64 * 0.05,
        "RSS grew from {rss_mid} to {rss_end} KiB over the last 200 requests (after warm-up: {rss_warm})"
    );
    let r = http.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let status = interrupt(&mut child);
    assert!(status.success(), "whet serve exited with {status}");
}

#[test]
fn serve_refuses_bad_settings_in_one_line() {
    let (base, _, _) = fixture();
    let o = whet(&["serve", "--model", &base, "--adapter-dir", "/no/such/dir", "--port", "0"], "");
    let e = assert_one_line_error(&o);
    assert!(e.contains("--adapter-dir /no/such/dir"), "{e}");
    let o = whet(
        &["serve", "--model", &base, "--adapter", "x=tests/fixtures/adapters/dora", "--port", "0"],
        "",
    );
    let e = assert_one_line_error(&o);
    assert!(e.contains("`use_dora`"), "{e}");
}
