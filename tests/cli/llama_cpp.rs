//! whet's llama.cpp files in llama.cpp itself: the LoRA adapter GGUF (`whet adapter convert`)
//! on the base GGUF, and the merged GGUF (`whet merge --format gguf`), each give PEFT's greedy
//! tokens in llama-server. Needs llama.cpp built by scripts/build-llama-cpp.sh (or
//! `WHET_LLAMA_CPP_BIN`, a directory with llama-server); says SKIPPED otherwise.

use super::{root, stderr, whet};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn llama_cpp_bin() -> Option<PathBuf> {
    let dir = std::env::var_os("WHET_LLAMA_CPP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/llama.cpp/build/bin"));
    if dir.join("llama-server").is_file() {
        return Some(dir);
    }
    eprintln!(
        "SKIPPED: llama.cpp is not built ({} has no llama-server); run scripts/build-llama-cpp.sh",
        dir.display()
    );
    None
}

/// llama-server on a free port, killed when dropped.
struct LlamaServer {
    child: Child,
    url: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn llama_server(bin: &std::path::Path, args: &[&str]) -> LlamaServer {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(bin.join("llama-server"))
        .args(args)
        .args(["--port", &port.to_string(), "--host", "127.0.0.1", "-t", "2", "-c", "512"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = LlamaServer { child, url: format!("http://127.0.0.1:{port}") };
    let start = Instant::now();
    loop {
        let ok =
            reqwest::get(format!("{}/health", server.url)).await.is_ok_and(|r| r.status() == 200);
        if ok {
            return server;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "llama-server {args:?} did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// llama-server's 8 greedy tokens after `ids`.
async fn greedy(server: &LlamaServer, ids: &[u32]) -> Vec<u32> {
    let body = json!({"prompt": ids, "n_predict": 8, "temperature": 0, "top_k": 1,
                      "return_tokens": true, "cache_prompt": false});
    let r = reqwest::Client::new()
        .post(format!("{}/completion", server.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    serde_json::from_value(v["tokens"].clone()).unwrap_or_else(|_| panic!("no tokens in {v}"))
}

fn golden(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join(file)).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cpp_runs_whets_lora_gguf_and_merged_gguf_as_peft_does() {
    let Some(bin) = llama_cpp_bin() else { return };
    let base = root().join("tests/fixtures/families/llama3.gguf");
    let adapter = root().join("tests/fixtures/adapters/patterns");
    let tmp = tempfile::tempdir().unwrap();
    let (lora, merged) = (tmp.path().join("lora.gguf"), tmp.path().join("merged.gguf"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let o = whet(
        &[
            "adapter",
            "convert",
            &s(&adapter),
            "--to",
            "gguf",
            "--model",
            &s(&base),
            "--out",
            &s(&lora),
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = whet(
        &[
            "merge",
            "--model",
            &s(&base),
            "--adapter",
            &s(&adapter),
            "--format",
            "gguf",
            "--out",
            &s(&merged),
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let adapters = golden("tests/fixtures/adapters/golden.json");
    let ids: Vec<u32> = serde_json::from_value(adapters["ids"].clone()).unwrap();
    let peft: Vec<u32> =
        serde_json::from_value(adapters["adapters"]["patterns"]["greedy"].clone()).unwrap();
    let families = golden("tests/fixtures/families/golden.json");
    let plain: Vec<u32> =
        serde_json::from_value(families["families"]["llama3"]["greedy"].clone()).unwrap();
    // The base alone first: llama.cpp reads the prompt as transformers does.
    let server = llama_server(&bin, &["-m", &s(&base)]).await;
    assert_eq!(greedy(&server, &ids).await, plain, "llama.cpp, base only");
    drop(server);
    let server = llama_server(&bin, &["-m", &s(&base), "--lora", &s(&lora)]).await;
    assert_eq!(greedy(&server, &ids).await, peft, "llama.cpp with whet's LoRA GGUF");
    drop(server);
    let server = llama_server(&bin, &["-m", &s(&merged)]).await;
    assert_eq!(greedy(&server, &ids).await, peft, "llama.cpp with whet's merged GGUF");
}

/// `whet distill` with llama.cpp's `llama-server` as its OpenAI-compatible teacher: the client
/// against the real other side. Every input is asked once, each answer is a label or a counted
/// drop, and the student's data holds no instruction of the teacher's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distill_labels_through_llama_server() {
    let Some(bin) = llama_cpp_bin() else { return };
    if !super::have_default_model() {
        return;
    }
    let model = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let server = llama_server(&bin, &["-m", model.to_str().unwrap(), "-np", "2"]).await;
    let tmp = tempfile::tempdir().unwrap();
    let reviews: String = (0..12)
        .map(|i| {
            if i % 2 == 0 {
                format!("I loved this film, a joy (review {i})\n")
            } else {
                format!("A dull, boring waste of time (review {i})\n")
            }
        })
        .collect();
    let (inputs, system, out) =
        (tmp.path().join("reviews.txt"), tmp.path().join("system.txt"), tmp.path().join("out"));
    std::fs::write(&inputs, reviews).unwrap();
    let instruction = "Classify the movie review as positive or negative. Answer with one word.";
    std::fs::write(&system, instruction).unwrap();
    let url = format!("{}/v1", server.url);
    let o = tokio::task::spawn_blocking(move || {
        whet(
            &[
                "distill",
                "--teacher",
                &url,
                "--teacher-model",
                "smollm2",
                "--inputs",
                inputs.to_str().unwrap(),
                "--system-prompt-file",
                system.to_str().unwrap(),
                "--labels",
                "positive,negative",
                "--max-tokens",
                "8",
                "--stop",
                "\n",
                "--concurrency",
                "2",
                "--out",
                out.to_str().unwrap(),
            ],
            "",
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.path().join("out");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("distill.json")).unwrap()).unwrap();
    assert_eq!(summary["teacher_calls"], 12, "{summary}");
    let dropped: u64 =
        summary["dropped"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(summary["kept"].as_u64().unwrap() + dropped, 12, "{summary}");
    for file in ["train.jsonl", "valid.jsonl", "test.jsonl"] {
        for line in std::fs::read_to_string(out.join(file)).unwrap_or_default().lines() {
            assert!(!line.contains(instruction), "the teacher's prompt leaked: {line}");
            let v: Value = serde_json::from_str(line).unwrap();
            let answer = v["messages"][1]["content"].as_str().unwrap();
            assert!(answer == "positive" || answer == "negative", "{line}");
        }
    }
}
