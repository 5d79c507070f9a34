//! The HTTP routes: OpenAI's request and response shapes on one side, engine commands on the
//! other.

use crate::api::{self, ChatRequest, CompletionRequest, PromptInput};
use crate::error::ApiError;
use crate::worker::Command;
use crate::{unix_now, AdapterEntry, AppState, Slot};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use whet_infer::{Event, GenerateConfig, Generation};

type Shared = State<Arc<AppState>>;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/", get(playground))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .fallback(|| async { ApiError::not_found("not_found", "no such route".into()) })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::method_not_allowed(req.method().as_str(), req.uri().path())
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::guard::guard))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn playground() -> Html<&'static str> {
    Html(include_str!("playground.html"))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(state): Shared) -> Json<Value> {
    let base = &state.cfg.model_id;
    let mut data = vec![json!({
        "id": base, "object": "model", "created": state.created, "owned_by": "whet",
    })];
    for a in read(&state).iter() {
        data.push(json!({
            "id": a.name, "object": "model", "created": a.created, "owned_by": "whet",
            "parent": base, "adapter_weight": a.weight,
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

fn read(state: &AppState) -> std::sync::RwLockReadGuard<'_, Vec<AdapterEntry>> {
    state.adapters.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(state: &AppState) -> std::sync::RwLockWriteGuard<'_, Vec<AdapterEntry>> {
    state.adapters.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The body, or the error the body limit or a broken upload calls for.
fn body(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.cfg.max_body_bytes)
        } else {
            ApiError::bad_request(format!("cannot read the body: {e}"))
        }
    })
}

/// What both endpoints do once they have a prompt.
struct Job {
    model: String,
    prompt: Vec<u32>,
    config: GenerateConfig,
    adapters: Vec<(String, f64)>,
    stream: bool,
    include_usage: bool,
}

/// The adapters the request's `model` names: none for the base, or one adapter.
fn resolve_model(state: &AppState, model: &str) -> Result<Vec<(String, f64)>, ApiError> {
    if model == state.cfg.model_id {
        return Ok(vec![]);
    }
    let adapters = read(state);
    match adapters.iter().find(|a| a.name == model) {
        Some(a) => Ok(vec![(a.name.clone(), a.weight)]),
        None => {
            let known: Vec<&str> = std::iter::once(state.cfg.model_id.as_str())
                .chain(adapters.iter().map(|a| a.name.as_str()))
                .collect();
            Err(ApiError {
                param: Some("model".into()),
                ..ApiError::not_found(
                    "model_not_found",
                    format!("no model `{model}`; this server has: {}", known.join(", ")),
                )
            })
        }
    }
}

fn job(state: &AppState, common: &api::Common, prompt: Vec<u32>) -> Result<Job, ApiError> {
    let adapters = resolve_model(state, &common.model)?;
    let limit = state.cfg.max_tokens;
    let mut config = state.cfg.defaults.clone();
    config.max_tokens = config.max_tokens.min(limit);
    if let Some(n) = common.max_completion_tokens.or(common.max_tokens) {
        if n == 0 || n > limit {
            return Err(ApiError::unprocessable(
                format!("`max_tokens` must be between 1 and the server's limit {limit}, got {n}"),
                Some("max_tokens"),
            ));
        }
        config.max_tokens = n;
    }
    if let Some(t) = common.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::unprocessable(
                format!("`temperature` must be between 0 and 2, got {t}"),
                Some("temperature"),
            ));
        }
        config.sampling.temperature = t;
    }
    if let Some(p) = common.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::unprocessable(
                format!("`top_p` must be in (0, 1], got {p}"),
                Some("top_p"),
            ));
        }
        config.sampling.top_p = p;
    }
    config.sampling.seed = common.seed.unwrap_or_else(rand::random);
    config.stop = common.stop()?;
    if prompt.is_empty() {
        return Err(ApiError::unprocessable("the prompt is empty".into(), Some("prompt")));
    }
    if prompt.len() >= state.context {
        let mut e = ApiError::unprocessable(
            format!(
                "the prompt has {} tokens but the model's context is {}",
                prompt.len(),
                state.context
            ),
            Some("messages"),
        );
        e.code = "context_length_exceeded";
        return Err(e);
    }
    let vocab = state.vocab;
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::unprocessable(
            format!("token id {bad} is outside the vocabulary of {vocab}"),
            Some("prompt"),
        ));
    }
    Ok(Job {
        model: common.model.clone(),
        prompt,
        config,
        adapters,
        stream: common.stream,
        include_usage: common.include_usage(),
    })
}

async fn chat_completions(
    State(state): Shared,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let slot = Slot::take(&state)?;
    let req: ChatRequest = api::parse(&body(&state, raw)?, api::CHAT)?;
    req.check()?;
    let text = state.template.render(&req.messages()?, true).map_err(|e| {
        ApiError::unprocessable(format!("the chat template failed: {e}"), Some("messages"))
    })?;
    let prompt = encode(&state, &text)?;
    let job = job(&state, &req.common, prompt)?;
    run(state, slot, job, Kind::Chat).await
}

async fn completions(
    State(state): Shared,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let slot = Slot::take(&state)?;
    let req: CompletionRequest = api::parse(&body(&state, raw)?, api::COMPLETION)?;
    req.check()?;
    let prompt = match req.prompt()? {
        PromptInput::Text(t) => encode(&state, &t)?,
        PromptInput::Ids(ids) => ids,
    };
    let job = job(&state, &req.common, prompt)?;
    run(state, slot, job, Kind::Completion).await
}

fn encode(state: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    state
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::unprocessable(format!("cannot tokenize the prompt: {e}"), None))
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

/// Hand the job to the engine and answer with its result, whole or streamed.
async fn run(state: Arc<AppState>, slot: Slot, job: Job, kind: Kind) -> Result<Response, ApiError> {
    let (events, mut rx) = mpsc::unbounded_channel();
    let (accepted, ok) = oneshot::channel();
    let request = whet_infer::Request {
        prompt: job.prompt.clone(),
        config: job.config.clone(),
        adapters: job.adapters.clone(),
    };
    let gone = || ApiError::unavailable("the server is shutting down".into());
    // The slot is freed when both the response and the engine's work are done: a client
    // that hangs up during a long prefill counts against --max-concurrent until the engine
    // has stopped it, and a client that reads slowly until its answer is sent.
    let slot = Arc::new(slot);
    let engine_slot = slot.clone();
    state
        .engine
        .send(Command::Generate { request, events, accepted, slot: engine_slot })
        .map_err(|_| gone())?;
    match ok.await.map_err(|_| gone())? {
        Ok(()) => {}
        // Unloaded between the lookup and the engine taking the request.
        Err(e @ whet_infer::Error::UnknownAdapter { .. }) => {
            return Err(ApiError::not_found("model_not_found", e.to_string()));
        }
        Err(e) => return Err(ApiError::unprocessable(e.to_string(), None)),
    }
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed)),
        Kind::Completion => format!("cmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed)),
    };
    let created = unix_now();
    if !job.stream {
        // Dropping `rx` (the client hung up, so axum dropped this future) cancels generation.
        let g = loop {
            match rx.recv().await {
                Some(Event::Text(_) | Event::Progress { .. }) => {}
                Some(Event::Done(g)) => break g,
                Some(Event::Failed(m)) => {
                    return Err(ApiError::unavailable(format!("generation ended: {m}")))
                }
                None => return Err(ApiError::internal("the engine stopped".into())),
            }
        };
        drop(slot);
        let choice = match kind {
            Kind::Chat => json!({
                "index": 0, "logprobs": null, "finish_reason": g.stop_reason.finish_reason(),
                "message": {"role": "assistant", "content": g.text},
            }),
            Kind::Completion => json!({
                "index": 0, "logprobs": null, "finish_reason": g.stop_reason.finish_reason(),
                "text": g.text,
            }),
        };
        let object = match kind {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        };
        return Ok(Json(json!({
            "id": id, "object": object, "created": created, "model": job.model,
            "choices": [choice], "usage": usage(&g), "system_fingerprint": null,
        }))
        .into_response());
    }
    // Streaming: a task turns engine events into SSE events; when the client goes away, the
    // body's receiver is dropped, the task's send fails, it returns, and dropping `rx` tells
    // the engine to cancel.
    let (sse_tx, sse_rx) = mpsc::channel::<SseEvent>(64);
    let chunk = move |choice: Value, usage: Option<Value>| {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut c = json!({
            "id": id, "object": object, "created": created, "model": job.model,
            "choices": choice, "system_fingerprint": null,
        });
        if job.include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        SseEvent::default().data(c.to_string())
    };
    let piece = move |text: Option<&str>, finish: Option<&str>, first: bool| match kind {
        Kind::Chat => {
            let delta = match (text, first) {
                (_, true) => json!({"role": "assistant", "content": ""}),
                (Some(t), _) => json!({"content": t}),
                (None, _) => json!({}),
            };
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
        }
        Kind::Completion => json!([{
            "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
        }]),
    };
    let include_usage = job.include_usage;
    tokio::spawn(async move {
        let _slot = slot;
        if matches!(kind, Kind::Chat)
            && sse_tx.send(chunk(piece(None, None, true), None)).await.is_err()
        {
            return;
        }
        loop {
            let event = match rx.recv().await {
                // A comment line, which clients skip: writing something while there is no
                // text (a long prefill) is how the server learns that a client has hung up.
                Some(Event::Progress { prefilled, of, generated }) => SseEvent::default()
                    .comment(format!("prompt {prefilled}/{of}, generated {generated}")),
                Some(Event::Text(t)) => chunk(piece(Some(&t), None, false), None),
                Some(Event::Done(g)) => {
                    let last = chunk(piece(None, Some(g.stop_reason.finish_reason()), false), None);
                    if sse_tx.send(last).await.is_err() {
                        return;
                    }
                    if include_usage
                        && sse_tx.send(chunk(json!([]), Some(usage(&g)))).await.is_err()
                    {
                        return;
                    }
                    let _ = sse_tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                Some(Event::Failed(m)) => {
                    let e = ApiError::unavailable(format!("generation ended: {m}"));
                    let _ = sse_tx.send(SseEvent::default().data(e.body().to_string())).await;
                    return;
                }
                None => return,
            };
            if sse_tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(sse_rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, std::convert::Infallible>(e), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prefill_tokens,
        "completion_tokens": g.ids.len(),
        "total_tokens": g.prefill_tokens + g.ids.len(),
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    name: String,
    path: String,
    weight: Option<f64>,
}

async fn load_adapter(
    State(state): Shared,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(&state, raw)?;
    let req: LoadRequest = serde_json::from_slice::<Value>(&raw)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
        .and_then(|v| {
            serde_json::from_value(v)
                .map_err(|e| ApiError::unprocessable(format!("invalid request: {e}"), None))
        })?;
    let Some(root) = &state.adapter_root else {
        return Err(ApiError::bad_request(
            "loading adapters at run time is off; start whet serve with --adapter-dir DIR".into(),
        ));
    };
    let name = req.name.trim();
    if name.is_empty() || name.chars().any(char::is_whitespace) || name == state.cfg.model_id {
        return Err(ApiError::unprocessable(
            format!(
                "`name` `{}` must be non-empty, without spaces, and not the base model's id",
                req.name
            ),
            Some("name"),
        ));
    }
    if read(&state).iter().any(|a| a.name == name) {
        return Err(ApiError::unprocessable(
            format!("an adapter named `{name}` is already loaded"),
            Some("name"),
        ));
    }
    let weight = req.weight.unwrap_or(1.0);
    if !(weight as f32).is_finite() {
        return Err(ApiError::unprocessable(
            format!("`weight` {weight} is not a finite f32 number"),
            Some("weight"),
        ));
    }
    // No `..`, then canonical paths: neither it nor a symbolic link leads outside the
    // directory (and a missing path outside it is not told apart from an existing one).
    let outside = || ApiError {
        param: Some("path".into()),
        ..ApiError::bad_request(format!(
            "`path` `{}` is not a directory inside --adapter-dir",
            req.path
        ))
    };
    let given = std::path::Path::new(&req.path);
    if given.components().any(|c| c == std::path::Component::ParentDir)
        || (given.is_absolute() && !given.starts_with(root))
    {
        return Err(outside());
    }
    let dir = std::fs::canonicalize(root.join(given)).map_err(|_| {
        ApiError::not_found(
            "adapter_not_found",
            format!("`path` `{}`: no such adapter directory under --adapter-dir", req.path),
        )
    })?;
    if !dir.starts_with(root) || !dir.is_dir() {
        return Err(outside());
    }
    // The files too: a symbolic link inside the directory must not lead outside it either.
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        if let Ok(target) = std::fs::canonicalize(dir.join(file)) {
            if !target.starts_with(root) {
                return Err(ApiError {
                    param: Some("path".into()),
                    ..ApiError::bad_request(format!(
                        "`path` `{}`: `{file}` is a link to a file outside --adapter-dir",
                        req.path
                    ))
                });
            }
        }
    }
    // Reading the files is the slow part (a FIFO, a hung network disk): it runs on a blocking
    // thread under a timeout, and the engine thread only attaches what was read.
    let limit = state.cfg.net.adapter_load_timeout;
    let read = tokio::task::spawn_blocking(move || whet_model::adapter::AdapterFiles::read(&dir));
    let files = match tokio::time::timeout(limit, read).await {
        Err(_) => {
            return Err(ApiError::timed_out(format!(
                "reading adapter `{}` did not finish within {} s",
                req.path,
                limit.as_secs_f64()
            )))
        }
        Ok(Err(e)) => return Err(ApiError::internal(format!("reading the adapter failed: {e}"))),
        Ok(Ok(r)) => r.map_err(|e| ApiError::unprocessable(e.to_string(), Some("path")))?,
    };
    let (reply, done) = oneshot::channel();
    let gone = || ApiError::unavailable("the server is shutting down".into());
    let cmd = Command::Load { name: name.to_string(), files: Box::new(files), weight, reply };
    state.engine.send(cmd).map_err(|_| gone())?;
    done.await
        .map_err(|_| gone())?
        .map_err(|e| ApiError::unprocessable(e.to_string(), Some("path")))?;
    let entry = AdapterEntry { name: name.to_string(), weight, created: unix_now() };
    write(&state).push(entry.clone());
    tracing::info!("loaded adapter `{name}` from {}", req.path);
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": entry.name, "object": "model", "created": entry.created, "owned_by": "whet",
            "parent": state.cfg.model_id, "adapter_weight": weight,
        })),
    )
        .into_response())
}

async fn unload_adapter(
    State(state): Shared,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !read(&state).iter().any(|a| a.name == name) {
        return Err(ApiError::not_found(
            "model_not_found",
            format!("no adapter `{name}` is loaded"),
        ));
    }
    // Out of the list first: no new request picks it while the engine removes it.
    write(&state).retain(|a| a.name != name);
    let (reply, done) = oneshot::channel();
    let gone = || ApiError::unavailable("the server is shutting down".into());
    state.engine.send(Command::Unload { name: name.clone(), reply }).map_err(|_| gone())?;
    // Another request may have unloaded it meanwhile: that one answered, this one finds none.
    done.await.map_err(|_| gone())?.map_err(|e| match e {
        whet_model::Error::UnknownAdapter { .. } => {
            ApiError::not_found("model_not_found", format!("no adapter `{name}` is loaded"))
        }
        e => ApiError::internal(e.to_string()),
    })?;
    tracing::info!("unloaded adapter `{name}`");
    Ok(Json(json!({"id": name, "object": "model", "deleted": true})))
}
