//! `whet distill`: a prompted teacher labels unlabelled inputs; what the student gets, what is
//! dropped and counted, resuming after a kill, and bad input.

use crate::*;
use std::path::Path;

const SYSTEM: &str = "Classify the movie review as positive or negative. Answer with one word.";

/// Thirty short reviews, one per line, and the teacher's system prompt.
fn reviews(dir: &Path) -> (String, String) {
    let good = ["I loved this film", "A wonderful movie", "Great acting and a great story"];
    let bad = ["I hated this film", "A boring movie", "Terrible acting, a waste of time"];
    let lines: String = (0..30)
        .map(|i| {
            let text = if i % 2 == 0 { good[i % 3] } else { bad[i % 3] };
            format!("{text} (review {i})\n")
        })
        .collect();
    std::fs::write(dir.join("reviews.txt"), lines).unwrap();
    std::fs::write(dir.join("system.txt"), SYSTEM).unwrap();
    (dir.join("reviews.txt").display().to_string(), dir.join("system.txt").display().to_string())
}

fn teacher() -> String {
    root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf").display().to_string()
}

fn distill_args<'a>(
    inputs: &'a str,
    system: &'a str,
    out: &'a str,
    teacher: &'a str,
) -> Vec<&'a str> {
    vec![
        "distill",
        "--teacher",
        teacher,
        "--inputs",
        inputs,
        "--system-prompt-file",
        system,
        "--out",
        out,
        "--labels",
        "positive,negative",
        "--max-tokens",
        "8",
        "--stop",
        "\n",
    ]
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn distill_labels_inputs_into_a_dataset_without_the_teachers_prompt() {
    if !have_default_model() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, system) = reviews(tmp.path());
    let out = tmp.path().join("out");
    let teacher = teacher();
    let o = whet(&distill_args(&inputs, &system, out.to_str().unwrap(), &teacher), "");
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = json(&out.join("distill.json"));
    let kept = summary["kept"].as_u64().unwrap();
    let dropped: u64 =
        summary["dropped"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(kept + dropped, 30, "{summary}");
    assert!(kept > 0, "{summary}");
    let split = &summary["split"];
    let sizes: u64 = ["train", "valid", "test"].iter().map(|k| split[k].as_u64().unwrap()).sum();
    assert_eq!(sizes, kept);
    let mut answers = 0;
    for file in ["train.jsonl", "valid.jsonl", "test.jsonl"] {
        let Ok(text) = std::fs::read_to_string(out.join(file)) else { continue };
        // The student learns the bare input: the teacher's instruction is nowhere in its data.
        assert!(!text.contains("Classify the movie review"), "{file}: {text}");
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let messages = v["messages"].as_array().unwrap();
            assert_eq!(messages.len(), 2, "{line}");
            assert_eq!(messages[0]["role"], "user");
            let answer = messages[1]["content"].as_str().unwrap();
            assert!(["positive", "negative"].contains(&answer), "{line}");
            answers += 1;
        }
    }
    assert_eq!(answers, kept);
    assert!(stdout(&o).contains("(0 answered from the cache, 30 asked)"), "{}", stdout(&o));
    // whet's own commands read the result.
    let check = whet(&["data", "check", out.to_str().unwrap(), "--model", &teacher], "");
    assert!(check.status.success(), "{}", stderr(&check));
    // The same teacher settings ask the teacher nothing again, even with other filters.
    let mut again = distill_args(&inputs, &system, out.to_str().unwrap(), &teacher);
    again.extend(["--overwrite", "--min-agreement", "1"]);
    let o = whet(&again, "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(30 answered from the cache, 0 asked)"), "{}", stdout(&o));
    assert_eq!(json(&out.join("distill.json"))["teacher_calls"], 0);
}

#[test]
fn a_killed_distill_continues_where_it_stopped_and_gives_the_same_files() {
    if !have_default_model() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, system) = reviews(tmp.path());
    let teacher = teacher();
    // One sequence at a time: the same arithmetic whichever inputs are left to ask.
    let run = |out: &Path| {
        let mut args = distill_args(&inputs, &system, out.to_str().unwrap(), &teacher);
        args.extend(["--max-batch", "1"]);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let whole = tmp.path().join("whole");
    let o = whet(&run(&whole).iter().map(String::as_str).collect::<Vec<_>>(), "");
    assert!(o.status.success(), "{}", stderr(&o));

    let killed = tmp.path().join("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(run(&killed))
        .current_dir(root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some answers are in the cache beside --out.
    let cached = || {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(".killed.whet-distill-"))
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
            .map_or(0, |t| t.lines().count())
    };
    let start = std::time::Instant::now();
    while cached() < 4 && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = cached();
    assert!(before >= 4 && !killed.exists(), "the run ended before it could be killed");
    let o = whet(&run(&killed).iter().map(String::as_str).collect::<Vec<_>>(), "");
    assert!(o.status.success(), "{}", stderr(&o));
    let said = format!("({before} answered from the cache, {} asked)", 30 - before);
    assert!(stdout(&o).contains(&said), "{said} in {}", stdout(&o));
    for file in ["train.jsonl", "valid.jsonl", "test.jsonl", "answers.jsonl"] {
        assert_eq!(
            std::fs::read_to_string(whole.join(file)).ok(),
            std::fs::read_to_string(killed.join(file)).ok(),
            "{file}"
        );
    }
    let strip = |mut v: serde_json::Value| {
        let o = v.as_object_mut().unwrap();
        o.remove("teacher_calls");
        o.remove("answers_from_cache");
        v
    };
    assert_eq!(strip(json(&whole.join("distill.json"))), strip(json(&killed.join("distill.json"))));
}

#[test]
fn distill_refuses_bad_input_before_asking_the_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, system) = reviews(tmp.path());
    let out = tmp.path().join("out");
    let o_ = out.to_str().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"label\": \"positive\"}\n").unwrap();
    let b = bad.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            distill_args(b, &system, o_, "random:tiny"),
            "bad.jsonl:2: no input text: expected `messages` or one of text, input, prompt, question, instruction",
        ),
        (
            [distill_args(&inputs, &system, o_, "random:tiny"), vec!["--split", "0.8,0.1,0.2"]].concat(),
            "--split `0.8,0.1,0.2`: expected three shares that sum to 1",
        ),
        (
            [distill_args(&inputs, &system, o_, "random:tiny"), vec!["--samples", "3"]].concat(),
            "--samples 3 with greedy decoding asks the same question 3 times",
        ),
        (
            [distill_args(&inputs, &system, o_, "random:tiny"), vec!["--min-agreement", "1.5"]].concat(),
            "--min-agreement must be in [0, 1], got `1.5`",
        ),
        (
            distill_args(&inputs, &system, tmp.path().to_str().unwrap(), "random:tiny"),
            "holds this command's input (--inputs",
        ),
        // A random teacher never ends its answers: every input dropped, counted, nothing
        // written.
        (
            distill_args(&inputs, &system, o_, "random:tiny"),
            "reviews.txt: all 30 inputs were dropped (truncated 30); nothing was written",
        ),
    ];
    for (args, want) in cases {
        let err = assert_one_line_error(&whet(&args, ""));
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

/// A stand-in for an OpenAI-compatible server on loopback: each request gets the next of
/// `script`'s answers (status, body), then `answer(request body)` with 200 for ever after.
/// Returns its base URL and the request bodies it saw.
fn fake_server(
    script: Vec<(u16, String)>,
    answer: fn(&str) -> String,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut script = script.into_iter();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let body = String::from_utf8_lossy(&body).into_owned();
            let (status, reply) = script.next().unwrap_or_else(|| (200, answer(&body)));
            log.lock().unwrap().push(body);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (url, seen)
}

fn review_label(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let input = v["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap();
    let label = if input.contains("loved") || input.contains("wonderful") || input.contains("Great")
    {
        "Positive."
    } else {
        "negative"
    };
    serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": label}, "finish_reason": "stop"}]}).to_string()
}

#[test]
fn distill_asks_an_openai_compatible_endpoint_and_retries_429_and_5xx() {
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, system) = reviews(tmp.path());
    let busy = r#"{"error": {"message": "slow down"}}"#.to_string();
    let (url, seen) =
        fake_server(vec![(429, busy.clone()), (500, "oops".into()), (503, busy)], review_label);
    let out = tmp.path().join("out");
    let mut args = distill_args(&inputs, &system, out.to_str().unwrap(), &url);
    args.extend(["--teacher-model", "big", "--concurrency", "3"]);
    let o = whet(&args, "");
    assert!(o.status.success(), "{}", stderr(&o));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 33, "30 answers and 3 retried failures");
    // The teacher got the system prompt, the model asked for and the settings.
    let first: serde_json::Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(first["model"], "big");
    assert_eq!(first["messages"][0]["content"], SYSTEM);
    assert_eq!((first["max_tokens"].as_u64(), first["stop"][0].as_str()), (Some(8), Some("\n")));
    let summary = json(&out.join("distill.json"));
    assert_eq!(summary["kept"], 30, "{summary}");
    for file in ["train.jsonl", "valid.jsonl", "test.jsonl"] {
        for line in std::fs::read_to_string(out.join(file)).unwrap_or_default().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (input, answer) = (
                v["messages"][0]["content"].as_str().unwrap(),
                v["messages"][1]["content"].as_str().unwrap(),
            );
            let want = if input.contains("loved")
                || input.contains("wonderful")
                || input.contains("Great")
            {
                "positive"
            } else {
                "negative"
            };
            assert_eq!(answer, want, "{line}");
        }
    }
}

#[test]
fn an_endpoint_that_is_down_or_answers_nonsense_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, system) = reviews(tmp.path());
    let out = tmp.path().join("out");
    let o_ = out.to_str().unwrap();
    // Nothing listens on a port just freed.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = format!("http://{free}/v1");
    let (nonsense, _) = fake_server(vec![], |_| "<html>hello</html>".into());
    let (refuses, _) =
        fake_server(vec![(401, r#"{"error": {"message": "bad key"}}"#.into())], review_label);
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            [
                distill_args(&inputs, &system, o_, &down),
                vec!["--teacher-model", "m", "--retries", "1"],
            ]
            .concat(),
            format!("cannot reach {down}/chat/completions"),
        ),
        (
            [distill_args(&inputs, &system, o_, &nonsense), vec!["--teacher-model", "m"]].concat(),
            "answered 200 OK with something that is not JSON: <html>hello</html>".into(),
        ),
        (
            [distill_args(&inputs, &system, o_, &refuses), vec!["--teacher-model", "m"]].concat(),
            "answered 401 Unauthorized: bad key".into(),
        ),
        (
            distill_args(&inputs, &system, o_, &down),
            "is an endpoint: say which model to ask for".into(),
        ),
        (
            [distill_args(&inputs, &system, o_, "random:tiny"), vec!["--teacher-model", "m"]]
                .concat(),
            "--teacher-model is for an endpoint teacher".into(),
        ),
    ];
    for (args, want) in cases {
        let err = assert_one_line_error(&whet(&args, ""));
        assert!(err.contains(&want), "{args:?}: {err}");
        assert!(!out.exists());
    }
}

/// The endpoint client against whet's own server gives what the same model gives in process.
#[test]
fn distill_through_whet_serve_equals_the_local_teacher() {
    if !have_default_model() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, system) = reviews(tmp.path());
    let teacher = teacher();
    let local = tmp.path().join("local");
    let mut args = distill_args(&inputs, &system, local.to_str().unwrap(), &teacher);
    args.extend(["--max-batch", "1"]);
    let o = whet(&args, "");
    assert!(o.status.success(), "{}", stderr(&o));
    let (mut server, url) = crate::serve::serve(&["--model", &teacher, "--max-batch", "1"]);
    let remote = tmp.path().join("remote");
    let base = format!("{url}/v1");
    let mut args = distill_args(&inputs, &system, remote.to_str().unwrap(), &base);
    args.extend(["--teacher-model", "SmolLM2-135M-Instruct.Q4_1", "--concurrency", "1"]);
    let o = whet(&args, "");
    let _ = server.kill();
    assert!(o.status.success(), "{}", stderr(&o));
    for file in ["train.jsonl", "valid.jsonl", "test.jsonl"] {
        assert_eq!(
            std::fs::read_to_string(local.join(file)).ok(),
            std::fs::read_to_string(remote.join(file)).ok(),
            "{file}"
        );
    }
}

#[test]
fn answers_that_break_the_rules_are_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, system) = reviews(tmp.path());
    let rules = tmp.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nname = \"bare\"\nmust_match = \"^(positive|negative)$\"\n")
        .unwrap();
    let (url, _) = fake_server(vec![], review_label);
    let out = tmp.path().join("out");
    let o = whet(
        &[
            "distill",
            "--teacher",
            &url,
            "--teacher-model",
            "m",
            "--inputs",
            &inputs,
            "--system-prompt-file",
            &system,
            "--rules",
            rules.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The stand-in answers "Positive." to the fifteen good reviews: it breaks the rule.
    let summary = json(&out.join("distill.json"));
    assert_eq!(
        (summary["kept"].as_u64(), summary["dropped"]["breaks_rules"].as_u64()),
        (Some(15), Some(15)),
        "{summary}"
    );
    assert!(stdout(&o).contains("dropped:  breaks_rules 15"), "{}", stdout(&o));
    std::fs::write(&rules, "[[rule]]\nname = \"x\"\n").unwrap();
    let o = whet(
        &[
            "distill",
            "--teacher",
            &url,
            "--teacher-model",
            "m",
            "--inputs",
            &inputs,
            "--rules",
            rules.to_str().unwrap(),
            "--out",
            tmp.path().join("o2").to_str().unwrap(),
        ],
        "",
    );
    let err = assert_one_line_error(&o);
    assert!(err.contains("rules.toml"), "{err}");
}

/// A stand-in teacher answering JSON: for good reviews in a code fence with a score, for bad
/// ones bare; for every fifth review a sentiment outside the schema's.
fn review_json(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let input = v["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap();
    let n: usize = input.rsplit("review ").next().unwrap().trim_end_matches(')').parse().unwrap();
    let good = input.contains("loved") || input.contains("wonderful") || input.contains("Great");
    let content = if n % 5 == 4 {
        r#"{"sentiment": "mixed"}"#.to_string()
    } else if good {
        "```json\n{ \"sentiment\" : \"positive\",\n  \"score\": 5 }\n```".to_string()
    } else {
        r#"{"sentiment":"negative"}"#.to_string()
    };
    serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).to_string()
}

#[test]
fn answers_outside_the_json_schema_are_dropped_and_the_rest_kept_as_bare_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, system) = reviews(tmp.path());
    let schema = tmp.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "required": ["sentiment"],
            "properties": {"sentiment": {"enum": ["positive", "negative"]},
                           "score": {"type": "integer", "minimum": 1, "maximum": 5}}}"#,
    )
    .unwrap();
    let (url, _) = fake_server(vec![], review_json);
    let out = tmp.path().join("out");
    let run = |schema: &Path, out: &Path, extra: &[&str]| {
        let mut a = vec!["distill", "--teacher", &url, "--teacher-model", "m", "--inputs", &inputs];
        a.extend(["--system-prompt-file", &system, "--out", out.to_str().unwrap()]);
        a.extend(["--json-schema", schema.to_str().unwrap()]);
        a.extend(extra);
        whet(&a, "")
    };
    let o = run(&schema, &out, &["--samples", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = json(&out.join("distill.json"));
    // Reviews 4, 9, ... 29 answered `mixed`: six of thirty.
    assert_eq!(
        (summary["kept"].as_u64(), summary["dropped"]["breaks_schema"].as_u64()),
        (Some(24), Some(6)),
        "{summary}"
    );
    assert!(stdout(&o).contains("breaks_schema 6"), "{}", stdout(&o));
    let mut seen = 0;
    for file in ["train.jsonl", "valid.jsonl", "test.jsonl"] {
        for line in std::fs::read_to_string(out.join(file)).unwrap_or_default().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let answer = v["messages"][1]["content"].as_str().unwrap();
            // The JSON alone, compact: no fence, no spacing the student would copy.
            assert!(
                answer == r#"{"sentiment":"positive","score":5}"#
                    || answer == r#"{"sentiment":"negative"}"#,
                "{answer}"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 24);
    // A schema that is not one is refused before the teacher is asked.
    std::fs::write(&schema, r#"{"type": "objekt"}"#).unwrap();
    let e = assert_one_line_error(&run(&schema, &tmp.path().join("o2"), &[]));
    assert!(e.contains("schema.json: not a valid JSON Schema"), "{e}");
    assert!(!tmp.path().join("o2").exists());
}

#[test]
fn distill_train_trains_the_student_and_compares_it_on_the_held_out_split_and_gold() {
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, system) = reviews(tmp.path());
    let (url, _) = fake_server(vec![], review_label);
    let cfg = tmp.path().join("train.toml");
    std::fs::write(&cfg, "steps = 2\nbatch_size = 2\nmax_seq_len = 64\n").unwrap();
    let gold = tmp.path().join("gold.jsonl");
    let line = |q: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            .to_string()
            + "\n"
    };
    std::fs::write(&gold, line("I loved it", "positive") + &line("Dull and long", "negative"))
        .unwrap();
    let (out, run) = (tmp.path().join("out"), tmp.path().join("student"));
    let args = |extra: &[&str]| {
        let mut a = vec!["distill", "--teacher", &url, "--teacher-model", "m", "--inputs", &inputs];
        a.extend([
            "--system-prompt-file",
            &system,
            "--labels",
            "positive,negative",
            "--max-tokens",
            "4",
        ]);
        a.extend(["--out", out.to_str().unwrap(), "--train", run.to_str().unwrap()]);
        a.extend(["--student", "random:tiny", "--train-config", cfg.to_str().unwrap()]);
        a.extend(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let a = args(&["--gold", gold.to_str().unwrap()]);
    let o = whet(&a.iter().map(String::as_str).collect::<Vec<_>>(), "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(run.join("adapter/adapter_model.safetensors").is_file());
    assert!(stderr(&o).contains("the teacher is an endpoint"), "{}", stderr(&o));
    for (name, n) in [
        ("compare", json(&out.join("distill.json"))["split"]["test"].as_u64().unwrap()),
        ("compare-gold", 2),
    ] {
        let r = json(&run.join(name).join("report.json"));
        let kinds: Vec<&str> =
            r["arms"].as_array().unwrap().iter().map(|a| a["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["prompted", "finetuned", "finetuned+prompt"], "{name}");
        assert_eq!(r["settings"]["test_examples"].as_u64(), Some(n), "{name}");
        // The prompted arm is the student with the teacher's prompt.
        assert_eq!(r["settings"]["system_prompt"], SYSTEM, "{name}");
    }
    assert!(stdout(&o).contains("compare-gold ("), "{}", stdout(&o));
    // The run directory is checked before the teacher is asked: an earlier run is kept
    // without --overwrite; a --gold line without an answer is named.
    let e =
        assert_one_line_error(&whet(&args(&[]).iter().map(String::as_str).collect::<Vec<_>>(), ""));
    assert!(e.contains("--train") && e.contains("already holds files"), "{e}");
    std::fs::write(&gold, "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n").unwrap();
    std::fs::remove_dir_all(&run).unwrap();
    let a = args(&["--gold", gold.to_str().unwrap()]);
    let e = assert_one_line_error(&whet(&a.iter().map(String::as_str).collect::<Vec<_>>(), ""));
    assert!(e.contains("gold.jsonl:1"), "{e}");
    assert!(!run.exists());
}

/// `whet bench distill` labels the same inputs one at a time and then batched (a local
/// teacher) or concurrently (an endpoint), and reports both rates; it writes nothing.
#[test]
fn bench_distill_reports_single_and_parallel_rates() {
    let tmp = tempfile::tempdir().unwrap();
    let (inputs, _) = reviews(tmp.path());
    let o = whet(
        &[
            "bench",
            "distill",
            "--teacher",
            "random:tiny",
            "--inputs",
            &inputs,
            "--limit",
            "6",
            "--max-tokens",
            "3",
            "--max-batch",
            "4",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for key in [
        "one at a time",
        "batched, up to 4 at once",
        "inputs/s (6 inputs",
        "speed-up:",
        "load avg:",
    ] {
        assert!(out.contains(key), "{out}");
    }
    let (url, seen) = fake_server(vec![], review_label);
    let o = whet(
        &[
            "bench",
            "distill",
            "--teacher",
            &url,
            "--teacher-model",
            "m",
            "--inputs",
            &inputs,
            "--limit",
            "5",
            "--concurrency",
            "3",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("3 requests in flight"), "{}", stdout(&o));
    assert_eq!(seen.lock().unwrap().len(), 10, "five inputs, twice");
    let leftovers: Vec<_> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "nothing written beside the inputs: {leftovers:?}");
}
