//! `whet bench serve`: the server under concurrent load over loopback. Bounded: a fixed number
//! of requests, each generating exactly `tokens` tokens (end-of-sequence ignored), then it
//! stops.

use crate::ServeConfig;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use whet_model::{Llama, ModelTokenizer};

/// What one round of concurrent requests measured.
#[derive(Debug, Clone)]
pub struct Round {
    /// Requests sent at once.
    pub concurrency: usize,
    /// Wall-clock seconds from the first request to the last answer.
    pub secs: f64,
    /// Tokens generated in all.
    pub tokens: usize,
    /// Per request: seconds to the first token, and to the end.
    pub ttft: Vec<f64>,
    /// Per request: seconds to the end.
    pub total: Vec<f64>,
}

impl Round {
    /// Generated tokens per second over the round.
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.secs.max(1e-9)
    }

    /// Requests answered per second.
    pub fn requests_per_sec(&self) -> f64 {
        self.concurrency as f64 / self.secs.max(1e-9)
    }
}

pub use whet_infer::bench::percentile;

/// Serve `model` on a loopback port and run one round per entry of `rounds` (that many
/// concurrent streamed chat requests of `tokens` tokens each).
pub async fn bench_serve(
    model: Llama,
    tokenizer: ModelTokenizer,
    mut cfg: ServeConfig,
    rounds: &[usize],
    tokens: usize,
) -> Result<Vec<Round>, crate::Error> {
    cfg.defaults.stop_at_eos = false;
    cfg.defaults.sampling.temperature = 0.0;
    cfg.max_tokens = cfg.max_tokens.max(tokens);
    cfg.max_concurrent = cfg.max_concurrent.max(rounds.iter().copied().max().unwrap_or(1));
    let model_id = cfg.model_id.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/chat/completions", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve(listener, cfg, model, tokenizer, async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let mut out = vec![];
    // One untimed request warms the caches and the allocator.
    let _ = one(&http, &url, &model_id, 0, tokens.min(4)).await;
    for &n in rounds {
        let start = Instant::now();
        let answers =
            futures_util::future::join_all((0..n).map(|i| one(&http, &url, &model_id, i, tokens)))
                .await;
        let secs = start.elapsed().as_secs_f64();
        let mut round = Round { concurrency: n, secs, tokens: 0, ttft: vec![], total: vec![] };
        for a in answers {
            let (ttft, total, t) = a.map_err(crate::Error::Config)?;
            round.ttft.push(ttft.as_secs_f64());
            round.total.push(total.as_secs_f64());
            round.tokens += t;
        }
        out.push(round);
    }
    let _ = stop.send(());
    server.await.map_err(|e| crate::Error::Config(e.to_string()))??;
    Ok(out)
}

/// One streamed chat request: time to first token, time to the end, tokens generated.
async fn one(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    i: usize,
    tokens: usize,
) -> Result<(Duration, Duration, usize), String> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("Write a short note about topic {i}.")}],
        "max_tokens": tokens, "stream": true, "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let mut r = http.post(url).json(&body).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("HTTP {}: {}", r.status(), r.text().await.unwrap_or_default()));
    }
    let (mut first, mut buf, mut generated) = (None, String::new(), 0);
    while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(at) = buf.find("\n\n") {
            let event: String = buf.drain(..at + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                first.get_or_insert_with(|| start.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                generated = n as usize;
            }
        }
    }
    let total = start.elapsed();
    Ok((first.unwrap_or(total), total, generated))
}
