//! whet serve over loopback with a real HTTP client: PEFT's greedy outputs per request
//! adapter, streaming, run-time adapters, limits and OpenAI-style errors, and the official
//! `openai` Python client where it is installed.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::oneshot;
use whet_infer::{EngineConfig, GenerateConfig};
use whet_model::{load, LoadedModel, ModelSource};
use whet_serve::ServeConfig;

/// The Python the tests run: `WHET_PYTHON`, else the project's `.venv/` (scripts/lib.sh), else
/// `python3`.
fn python() -> String {
    if let Ok(p) = std::env::var("WHET_PYTHON") {
        return p;
    }
    let venv = root().join(".venv/bin/python");
    if venv.exists() {
        venv.display().to_string()
    } else {
        "python3".into()
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn adapters_dir() -> PathBuf {
    root().join("tests/fixtures/adapters")
}

/// The tiny Llama 3 fixture with PEFT's `patterns` and `regex` adapters.
fn model() -> LoadedModel {
    let base = root().join("tests/fixtures/families/llama3");
    let mut m =
        load(&ModelSource::HfDir(base), candle_core::DType::F32, &candle_core::Device::Cpu, 0)
            .unwrap();
    for name in ["patterns", "regex"] {
        whet_model::adapter::load_named_adapter(
            &mut m.model,
            name,
            1.0,
            &adapters_dir().join(name),
        )
        .unwrap();
    }
    m
}

fn config() -> ServeConfig {
    ServeConfig {
        model_id: "base".into(),
        api_key: None,
        adapter_dir: Some(adapters_dir()),
        max_concurrent: 32,
        max_tokens: 64,
        max_body_bytes: 64 * 1024,
        engine: EngineConfig::default(),
        defaults: GenerateConfig { max_tokens: 8, ..GenerateConfig::default() },
        net: whet_serve::NetConfig::default(),
        allowed_hosts: vec![],
        cors_origins: vec![],
    }
}

struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
}

impl Server {
    async fn start(cfg: ServeConfig) -> Self {
        Self::start_with(cfg, model()).await
    }

    async fn start_with(cfg: ServeConfig, m: LoadedModel) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            whet_serve::serve(listener, cfg, m.model, m.tokenizer, shutdown).await.unwrap();
        });
        Server { url, stop: Some(stop), done: Some(done), http: reqwest::Client::new() }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.url)).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn raw(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.done.take().unwrap().await.unwrap();
    }
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(adapters_dir().join("golden.json")).unwrap())
        .unwrap()
}

/// PEFT's greedy text for `adapter`, decoded by the fixture's tokenizer.
fn peft_text(adapter: &str) -> String {
    let ids: Vec<u32> =
        serde_json::from_value(golden()["adapters"][adapter]["greedy"].clone()).unwrap();
    model().tokenizer.decode(&ids).unwrap()
}

fn completion(model: &str) -> Value {
    json!({"model": model, "prompt": golden()["ids"], "max_tokens": 8, "temperature": 0})
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an OpenAI error: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_adapters_give_pefts_greedy_output_even_when_concurrent() {
    let s = Server::start(config()).await;
    let r = s.http.get(format!("{}/v1/models", s.url)).send().await.unwrap();
    let models: Value = r.json().await.unwrap();
    let ids: Vec<&str> =
        models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["base", "patterns", "regex"]);
    // One at a time, then all at once (they then share batches).
    for adapter in ["patterns", "regex"] {
        let (status, body) = s.post("/v1/completions", completion(adapter)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["text"], peft_text(adapter), "{adapter}");
        assert_eq!(body["usage"]["prompt_tokens"], 12);
        assert_eq!(body["usage"]["completion_tokens"], 8);
        assert_eq!(body["choices"][0]["finish_reason"], "length");
    }
    let (base, _) = s.post("/v1/completions", completion("base")).await;
    assert_eq!(base, 200);
    let (_, base_alone) = s.post("/v1/completions", completion("base")).await;
    let names = ["patterns", "base", "regex", "patterns", "regex", "base"];
    let answers = futures_util::future::join_all(
        names.iter().map(|n| s.post("/v1/completions", completion(n))),
    )
    .await;
    for (name, (status, body)) in names.iter().zip(answers) {
        assert_eq!(status, 200);
        let want = match *name {
            "base" => base_alone["choices"][0]["text"].as_str().unwrap().to_string(),
            a => peft_text(a),
        };
        assert_eq!(body["choices"][0]["text"], want, "{name}");
    }
    s.stop().await;
}

/// The `data:` payloads of a server-sent event stream.
async fn sse(r: reqwest::Response) -> Vec<String> {
    let text = r.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_the_same_text_in_chunks_then_usage_then_done() {
    let s = Server::start(config()).await;
    let chat = json!({"model": "regex", "messages": [{"role": "user", "content": "hello"}],
                      "max_tokens": 12, "temperature": 0});
    let (status, whole) = s.post("/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{whole}");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r =
        s.http.post(format!("{}/v1/chat/completions", s.url)).json(&streamed).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let events = sse(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"], whole["usage"]);
    assert!(chunks[..n - 1].iter().all(|c| c["usage"].is_null()));
    // Completions stream too.
    let mut c = completion("patterns");
    c["stream"] = json!(true);
    let r = s.http.post(format!("{}/v1/completions", s.url)).json(&c).send().await.unwrap();
    let events = sse(r).await;
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, peft_text("patterns"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_an_openai_error() {
    let s = Server::start(config()).await;
    let chat = |extra: Value| {
        let mut b = json!({"model": "base", "messages": [{"role": "user", "content": "hi"}]});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            chat(json!({"model": "nope"})),
            404,
            "no model `nope`; this server has: base, patterns, regex",
        ),
        (chat(json!({"max_tokens": 65})), 422, "server's limit 64"),
        (chat(json!({"temprature": 0.5})), 422, "unknown field `temprature`"),
        (chat(json!({"n": 2})), 422, "`n` is not supported"),
        (chat(json!({"tools": [{"type": "function"}]})), 422, "`tools` is not supported"),
        (chat(json!({"temperature": "hot"})), 422, "invalid request"),
        (
            chat(json!({"messages": [{"role": "robot", "content": "x"}]})),
            422,
            "`robot` is not one of",
        ),
        (chat(json!({"stop": ["a", "b", "c", "d", "e"]})), 422, "at most 4"),
        (json!({"messages": [{"role": "user", "content": "x"}]}), 422, "missing field `model`"),
        // Regression: both length fields given, one silently won.
        (
            chat(json!({"max_tokens": 3, "max_completion_tokens": 5})),
            422,
            "`max_tokens` 3 and `max_completion_tokens` 5 disagree",
        ),
        // Regression: an image part got a generic 422.
        (
            chat(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]}]})),
            422,
            "messages[0].content[1]: images are not supported",
        ),
        (
            chat(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "x", "cache_control": {}},
            ]}]})),
            422,
            "unknown field `cache_control` in a text part",
        ),
        (
            chat(json!({"messages": [{"role": "user", "content": "x ".repeat(600)}]})),
            422,
            "context is 512",
        ),
    ];
    for (body, status, message) in cases {
        let (got, err) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(got, status, "{body} -> {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(message), "{err}");
        error_code(&err);
    }
    let (status, err) = s.raw("/v1/chat/completions", "{\"model\": ").await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("not valid JSON"));
    let (status, err) =
        s.raw("/v1/completions", &format!("{{\"prompt\": \"{}\"}}", "x".repeat(70_000))).await;
    assert_eq!((status, error_code(&err)), (413, "body_too_large"));
    let (status, err) =
        s.post("/v1/completions", json!({"model": "base", "prompt": [5, 99999]})).await;
    assert_eq!(status, 422);
    assert!(err["error"]["message"].as_str().unwrap().contains("outside the vocabulary"), "{err}");
    let r = s.http.get(format!("{}/v1/nothing", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // After all that, a good request is still answered.
    let (status, _) = s.post("/v1/completions", completion("regex")).await;
    assert_eq!(status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_everything_but_health_and_the_page() {
    let s = Server::start(ServeConfig { api_key: Some("sekrit".into()), ..config() }).await;
    let get = |path: &str, key: Option<&str>| {
        let mut r = s.http.get(format!("{}{path}", s.url));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    assert_eq!(get("/health", None).await.unwrap().status(), 200);
    let page = get("/", None).await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("whet playground") && !html.contains("http://") && !html.contains("https://"),
        "self-contained"
    );
    let r = get("/v1/models", None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(&r.json().await.unwrap()), "invalid_api_key");
    assert_eq!(get("/v1/models", Some("wrong")).await.unwrap().status(), 401);
    assert_eq!(get("/v1/models", Some("sekrit")).await.unwrap().status(), 200);
    let (status, _) = s.post("/v1/completions", completion("base")).await;
    assert_eq!(status, 401);
    // Regression: `bearer` in lowercase was refused; HTTP's auth schemes ignore case.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = s
            .http
            .get(format!("{}/v1/models", s.url))
            .header("authorization", format!("{scheme} sekrit"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    s.stop().await;
}

/// Regression: `Content-Type: text/plain` with an `Origin` of another site loaded an adapter
/// (201) on a server without a key: a web page can send such a body without asking first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_plain_body_from_a_web_page_drove_a_server_without_a_key() {
    let s = Server::start(config()).await;
    for (path, body) in [
        ("/v1/adapters", json!({"name": "x", "path": "regex"}).to_string()),
        ("/v1/chat/completions", json!({"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string()),
        ("/v1/completions", completion("base").to_string()),
    ] {
        for kind in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
            // From the page: refused for its origin. Without an origin: refused for its type.
            for (origin, status, code) in [
                (Some("http://evil.example"), 403, "origin_not_allowed"),
                (None, 415, "unsupported_media_type"),
            ] {
                let mut r = s.http.post(format!("{}{path}", s.url)).body(body.clone());
                if let Some(o) = origin {
                    r = r.header("origin", o);
                }
                if let Some(k) = kind {
                    r = r.header("content-type", k);
                }
                let r = r.send().await.unwrap();
                assert_eq!(r.status(), status, "{path} with {kind:?} from {origin:?}");
                assert!(r.headers().get("access-control-allow-origin").is_none());
                let v: Value = r.json().await.unwrap();
                assert_eq!(error_code(&v), code);
            }
        }
        // JSON with a charset parameter is JSON.
        let r = s.http.post(format!("{}{path}", s.url))
            .header("content-type", "Application/JSON; charset=utf-8").body(body.clone())
            .send().await.unwrap();
        assert_ne!(r.status(), 415, "{path}");
    }
    s.stop().await;
}

/// Regression: a `Content-Length` above the body limit was read before it was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_above_the_limit_gets_413_at_once() {
    let s = Server::start(config()).await;
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.url))
        .header("content-type", "application/json")
        .header("content-length", (10u64 << 30).to_string())
        .body(reqwest::Body::wrap_stream(futures_util::stream::pending::<
            Result<Vec<u8>, std::io::Error>,
        >()))
        .send();
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), r)
        .await
        .expect("413 came without waiting for the body")
        .unwrap();
    assert_eq!(r.status(), 413);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_and_unload_at_run_time_from_inside_the_adapter_dir_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapters");
    std::fs::create_dir(&dir).unwrap();
    let copy = |from: &str, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapters_dir().join(from).join(f), to.join(f)).unwrap();
        }
    };
    copy("layers", &dir.join("layers"));
    copy("dora", &dir.join("dora"));
    copy("regex", &tmp.path().join("outside"));
    std::os::unix::fs::symlink(tmp.path().join("outside"), dir.join("escape")).unwrap();
    let s = Server::start(ServeConfig { adapter_dir: Some(dir.clone()), ..config() }).await;
    let load = |name: &str, path: &str| s.post("/v1/adapters", json!({"name": name, "path": path}));
    let (status, body) = load("l", "layers").await;
    assert_eq!(status, 201, "{body}");
    let (_, body) = s.post("/v1/completions", completion("l")).await;
    assert_eq!(body["choices"][0]["text"], peft_text("layers"));
    let cases = [
        (load("x", "../outside").await, 400, "inside --adapter-dir"),
        (load("x", "../nothing-here").await, 400, "inside --adapter-dir"),
        (load("x", "/etc").await, 400, "inside --adapter-dir"),
        (load("x", "escape").await, 400, "inside --adapter-dir"),
        (load("x", "missing").await, 404, "no such adapter directory"),
        (load("x", "dora").await, 422, "`use_dora`"),
        (load("l", "layers").await, 422, "already loaded"),
        (load("base", "layers").await, 422, "base model"),
        // Regression: a weight past f32's range made every output NaN.
        (
            s.post("/v1/adapters", json!({"name": "w", "path": "layers", "weight": 1e39})).await,
            422,
            "`weight` 1000000000000000000000000000000000000000 is not a finite f32 number",
        ),
        (s.raw("/v1/adapters", "{\"name\": \"x\"}").await, 422, "missing field `path`"),
    ];
    for ((status, body), want, message) in cases {
        assert_eq!(status, want, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(message), "{body}");
    }
    let r = s.http.delete(format!("{}/v1/adapters/l", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (status, _) = s.post("/v1/completions", completion("l")).await;
    assert_eq!(status, 404, "unloaded");
    let r = s.http.delete(format!("{}/v1/adapters/l", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Loaded again under the same name: it serves again.
    assert_eq!(load("l", "layers").await.0, 201);
    s.stop().await;
    let s = Server::start(ServeConfig { adapter_dir: None, ..config() }).await;
    let (status, body) = s.post("/v1/adapters", json!({"name": "x", "path": "layers"})).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("--adapter-dir"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_stream_frees_its_slot_and_over_the_limit_gets_429() {
    let cfg = ServeConfig {
        max_concurrent: 1,
        max_tokens: 400,
        defaults: GenerateConfig { max_tokens: 400, stop_at_eos: false, ..Default::default() },
        ..config()
    };
    let s = Server::start(cfg).await;
    let long = json!({"model": "base", "prompt": "a", "max_tokens": 400, "stream": true});
    let mut r = s.http.post(format!("{}/v1/completions", s.url)).json(&long).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Comment lines (`: prompt 0/1, generated 0`) may come first; clients skip them.
    let mut first = r.chunk().await.unwrap().unwrap();
    while first.starts_with(b": ") {
        first = r.chunk().await.unwrap().unwrap();
    }
    assert!(first.starts_with(b"data: "), "{first:?}");
    let (status, body) = s.post("/v1/completions", completion("base")).await;
    assert_eq!((status, error_code(&body)), (429, "too_many_requests"));
    drop(r); // hang up
    let mut freed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if s.post("/v1/completions", completion("base")).await.0 == 200 {
            freed = true;
            break;
        }
    }
    assert!(freed, "the slot of the client that hung up was never freed");
    s.stop().await;
}

/// The official `openai` Python package against the server: listing, a completion, a chat
/// stream with usage, and two concurrent requests on different adapters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works() {
    let python = python();
    let has = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!(
            "SKIPPED: {python} lacks the `openai` package (scripts/test.sh installs it into .venv/; or set WHET_PYTHON)"
        );
        return;
    }
    let s = Server::start(config()).await;
    let script = root().join("tests/serve_openai.py");
    let (url, patterns, regex) =
        (format!("{}/v1", s.url), peft_text("patterns"), peft_text("regex"));
    let ids = golden()["ids"].to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args([url, ids, patterns, regex])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("openai client: all checks passed"), "{text}");
    s.stop().await;
}

/// A copy of the `patterns` fixture adapter's config in `dir`, and its weights as `weights`
/// says: copied, a FIFO, or a link.
fn adapter_copy(dir: &std::path::Path, weights: &str) {
    let from = adapters_dir().join("patterns");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(from.join("adapter_config.json"), dir.join("adapter_config.json")).unwrap();
    let to = dir.join("adapter_model.safetensors");
    match weights {
        "copy" => drop(std::fs::copy(from.join("adapter_model.safetensors"), &to).unwrap()),
        "fifo" => {
            let ok = std::process::Command::new("mkfifo").arg(&to).status().unwrap();
            assert!(ok.success());
        }
        link => std::os::unix::fs::symlink(link, &to).unwrap(),
    }
}

fn chat(content: &str) -> Value {
    json!({"model": "base", "messages": [{"role": "user", "content": content}], "max_tokens": 3})
}

/// Regression: an adapter whose `adapter_model.safetensors` was a FIFO, loaded with `POST
/// /v1/adapters`, blocked the engine thread (and every chat) until something wrote to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_whose_weights_are_a_fifo_stopped_every_chat_request() {
    let root = tempfile::tempdir().unwrap();
    adapter_copy(&root.path().join("fifo"), "fifo");
    adapter_copy(&root.path().join("config-fifo"), "copy");
    let cfg_file = root.path().join("config-fifo/adapter_config.json");
    std::fs::remove_file(&cfg_file).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(&cfg_file).status().unwrap().success());
    let s = Server::start(ServeConfig { adapter_dir: Some(root.path().into()), ..config() }).await;
    for path in ["fifo", "config-fifo"] {
        let load = s.post("/v1/adapters", json!({"name": path, "path": path}));
        let (status, body) = tokio::time::timeout(Duration::from_secs(20), load)
            .await
            .expect("a FIFO was opened instead of refused");
        assert_eq!(status, 422, "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("not a regular file"), "{msg}");
    }
    let (status, _) = s.post("/v1/chat/completions", chat("hi")).await;
    assert_eq!(status, 200);
    s.stop().await;
}

/// Regression: a file symbolic link inside `--adapter-dir` that leads outside it was followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_symlink_inside_the_adapter_dir_pointing_outside_was_followed() {
    let root = tempfile::tempdir().unwrap();
    let outside = adapters_dir().join("patterns/adapter_model.safetensors");
    adapter_copy(&root.path().join("out"), outside.to_str().unwrap());
    // A link that stays inside the directory is fine.
    adapter_copy(&root.path().join("real"), "copy");
    adapter_copy(&root.path().join("in"), "../real/adapter_model.safetensors");
    let s = Server::start(ServeConfig { adapter_dir: Some(root.path().into()), ..config() }).await;
    let (status, body) = s.post("/v1/adapters", json!({"name": "o", "path": "out"})).await;
    assert_eq!(status, 400, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("`adapter_model.safetensors` is a link to a file outside"), "{msg}");
    let (status, body) = s.post("/v1/adapters", json!({"name": "i", "path": "in"})).await;
    assert_eq!(status, 201, "{body}");
    s.stop().await;
}

/// One HTTP exchange over a raw socket: write `request`, read until the server closes (or
/// `within` passes: `None`).
async fn exchange(addr: &str, request: &[u8], within: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(request).await.unwrap();
    let mut got = vec![];
    let read = tokio::time::timeout(within, c.read_to_end(&mut got)).await;
    read.ok().map(|_| String::from_utf8_lossy(&got).into_owned())
}

fn addr(s: &Server) -> String {
    s.url.trim_start_matches("http://").to_string()
}

/// A connection with no request in progress is closed after the idle timeout: one that
/// sends nothing, one whose header trickles, one kept alive after its answer; a body that
/// does not arrive in time gets 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slow_and_kept_alive_connections_time_out_and_a_slow_body_gets_408() {
    let net = whet_serve::NetConfig {
        idle_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let s = Server::start(ServeConfig { net, ..config() }).await;
    let a = addr(&s);
    let wait = Duration::from_secs(10);
    let silent = exchange(&a, b"", wait).await.expect("a silent connection stayed open");
    assert_eq!(silent, "");
    let partial = exchange(&a, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", wait).await;
    assert_eq!(partial.expect("a connection whose header never ended stayed open"), "");
    let kept = exchange(&a, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", wait).await;
    let kept = kept.expect("a kept-alive connection stayed open");
    assert!(kept.starts_with("HTTP/1.1 200"), "{kept}");
    let slow = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":";
    let slow = exchange(&a, slow, wait).await.expect("a body that never came held the connection");
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow}");
    assert!(slow.contains("request_timeout"), "{slow}");
    s.stop().await;
}

/// The soft descriptor limit (which `whet serve` raises to the hard one).
fn descriptor_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024)
}

/// Regression: about 20,000 idle connections used up the descriptors and `/health` stopped
/// answering. Thousands held open, and then the cap reached: `/health` and a chat request
/// are still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_idle_connections_exhausted_the_descriptors() {
    let s = Server::start(config()).await;
    let (status, _) = s.get("/health").await;
    assert_eq!(status, 200);
    // Each connection takes two descriptors in this process, the client's and the server's.
    let limit = descriptor_limit();
    let n = 3000.min(limit.saturating_sub(whet_serve::RESERVED_FDS + 64) / 2);
    assert!(n >= 1000, "this process may open only {limit} descriptors");
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(tokio::net::TcpStream::connect(addr(&s)).await.unwrap());
    }
    let (status, _) = s.get("/health").await;
    assert_eq!(status, 200, "with {n} idle connections open");
    assert_eq!(s.post("/v1/chat/completions", chat("hi")).await.0, 200);
    drop(idle);
    s.stop().await;
    // At the cap, a new connection closes the one idle longest.
    let net = whet_serve::NetConfig { max_connections: Some(32), ..Default::default() };
    let s = Server::start(ServeConfig { net, ..config() }).await;
    let mut idle = vec![];
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(addr(&s)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    for _ in 0..3 {
        let r = http.get(format!("{}/health", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "at the cap of 32 connections");
    }
    let r = http.post(format!("{}/v1/chat/completions", s.url)).json(&chat("hi")).send();
    assert_eq!(r.await.unwrap().status(), 200);
    drop(idle);
    s.stop().await;
}

/// Regression: a `Host` naming another site (DNS rebinding) was served, and so was a page
/// of another site; CORS headers come only for `--cors-origin`; 405 has a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_host_name_and_a_page_of_another_site_were_served() {
    let s = Server::start(config()).await;
    let get = |host: &'static str| s.http.get(format!("{}/v1/models", s.url)).header("host", host);
    let r = get("attacker.example:8080").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "host_not_allowed");
    assert!(v["error"]["message"].as_str().unwrap().contains("--allowed-host attacker.example"));
    assert_eq!(get("localhost:8080").send().await.unwrap().status(), 200);
    // The playground's own page calls the API from the server's origin.
    let own = s.http.post(format!("{}/v1/chat/completions", s.url)).header("origin", &s.url);
    assert_eq!(own.json(&chat("hi")).send().await.unwrap().status(), 200);
    let preflight = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/v1/chat/completions", s.url))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST");
    let r = preflight.send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = s.http.get(format!("{}/v1/chat/completions", s.url)).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "method_not_allowed");
    s.stop().await;

    let cfg = ServeConfig {
        allowed_hosts: vec!["box.lan".into()],
        cors_origins: vec!["https://app.example".into()],
        ..config()
    };
    let s = Server::start(cfg).await;
    let r = s.http.get(format!("{}/health", s.url)).header("host", "BOX.lan:80").send();
    assert_eq!(r.await.unwrap().status(), 200);
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/v1/chat/completions", s.url))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example");
    let post = s.http.post(format!("{}/v1/chat/completions", s.url));
    let r = post.header("origin", "https://app.example").json(&chat("hi")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "https://app.example");
    let post = s.http.post(format!("{}/v1/chat/completions", s.url));
    let r = post.header("origin", "https://other.example").json(&chat("hi")).send().await;
    assert_eq!(r.unwrap().status(), 403);
    s.stop().await;
}

/// Regression: six streamed requests with long prompts, each closed after 0.5 s, were all
/// accepted under `--max-concurrent 4`, their prefills running on: a request that hung up
/// while it waited for the engine freed its slot, and the engine then ran it anyway. Now it
/// counts until the engine drops it, which it does without running its prompt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_long_prompts_closed_after_half_a_second_were_all_accepted() {
    // Big enough that a 3,000-token prompt in one step takes seconds on any CPU; the engine
    // takes new requests only between steps.
    let m = load(
        &ModelSource::Random("smollm2-135m".into()),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        0,
    )
    .unwrap();
    let cfg = ServeConfig {
        max_concurrent: 2,
        max_tokens: 2000,
        engine: EngineConfig { prefill_chunk: 4096, ..EngineConfig::default() },
        defaults: GenerateConfig { max_tokens: 2000, stop_at_eos: false, ..Default::default() },
        ..config()
    };
    let s = Server::start_with(cfg, m).await;
    let ids: Vec<u32> = (0..3000).map(|i| 3 + i % 250).collect();
    let long = json!({"model": "base", "prompt": ids, "max_tokens": 2000, "stream": true});
    let long = long.to_string();
    // Raw sockets, so that hanging up is a close the server sees, not a pooled connection.
    let send = || async {
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::TcpStream::connect(addr(&s)).await.unwrap();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            long.len()
        );
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(long.as_bytes()).await.unwrap();
        c
    };
    let running = send().await;
    tokio::time::sleep(Duration::from_millis(300)).await; // its prefill has started
    let waiting = send().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(waiting);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let short = json!({"model": "base", "prompt": [5, 6], "max_tokens": 1});
    let (status, body) = s.post("/v1/completions", short.clone()).await;
    assert_eq!((status, error_code(&body)), (429, "too_many_requests"), "{body}");
    drop(running);
    let mut freed = false;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.post("/v1/completions", short.clone()).await.0 == 200 {
            freed = true;
            break;
        }
    }
    assert!(freed, "the slots of the clients that hung up were never freed");
    s.stop().await;
}
