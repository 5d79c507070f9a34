//! whet-serve: `whet serve`, an OpenAI-compatible HTTP server (axum on tokio) over whet's
//! batched engine. Every request picks the base model or one of the loaded adapters by its
//! `model` field; requests on different adapters decode in the same batch. Adapters can be
//! loaded and removed while the server runs, from inside `--adapter-dir` only.
//!
//! Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
//! `stream: true` as server-sent events), `POST /v1/adapters`, `DELETE /v1/adapters/{name}`,
//! `GET /health`, and the playground page at `GET /`.
#![warn(missing_docs)]

mod api;
pub mod bench;
mod conn;
mod error;
mod guard;
mod routes;
mod worker;

pub use conn::{NetConfig, RESERVED_FDS};
pub use error::ApiError;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use whet_infer::{ChatTemplate, EngineConfig, GenerateConfig};
use whet_model::{Llama, ModelTokenizer};

/// Server settings (the `whet serve` flags).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The id the base model answers to in `model` fields and `/v1/models`.
    pub model_id: String,
    /// With a key, every route but `/health` and the static playground page needs
    /// `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// `POST /v1/adapters` loads adapters from inside this directory only; without it,
    /// loading at run time is off.
    pub adapter_dir: Option<PathBuf>,
    /// Most requests in flight (running or queued); more get 429.
    pub max_concurrent: usize,
    /// Most tokens one request may ask for; more is 422.
    pub max_tokens: usize,
    /// Largest request body; larger is 413.
    pub max_body_bytes: usize,
    /// Batch size and prefill chunk of the engine.
    pub engine: EngineConfig,
    /// Settings a request does not give (from the sampling flags).
    pub defaults: GenerateConfig,
    /// Connection limits and timeouts.
    pub net: NetConfig,
    /// Host names a request's `Host` header may carry besides IP addresses and `localhost`
    /// (`*`: any), so that a web page reached through a rebound DNS name cannot talk to the
    /// server.
    pub allowed_hosts: Vec<String>,
    /// Web origins (`https://app.example`, or `*`) whose pages may call the API: they get
    /// CORS headers. Without any, a browser page from another site can neither read an answer
    /// nor send a JSON body.
    pub cors_origins: Vec<String>,
}

/// An adapter the server can serve.
#[derive(Debug, Clone)]
pub(crate) struct AdapterEntry {
    pub(crate) name: String,
    pub(crate) weight: f64,
    pub(crate) created: u64,
}

/// What the handlers share.
pub(crate) struct AppState {
    pub(crate) cfg: ServeConfig,
    /// The canonical `--adapter-dir`.
    pub(crate) adapter_root: Option<PathBuf>,
    pub(crate) tokenizer: Arc<ModelTokenizer>,
    pub(crate) template: ChatTemplate,
    pub(crate) context: usize,
    /// Rows of the embedding: token ids must be below.
    pub(crate) vocab: usize,
    pub(crate) created: u64,
    pub(crate) adapters: RwLock<Vec<AdapterEntry>>,
    pub(crate) engine: std::sync::mpsc::Sender<worker::Command>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) next_id: AtomicU64,
}

/// A request slot of `--max-concurrent`; freed when dropped. The engine holds it with the
/// request's events, so a request whose client hung up counts until its work has stopped.
pub(crate) struct Slot(Arc<AppState>);

impl Slot {
    pub(crate) fn take(state: &Arc<AppState>) -> Result<Self, ApiError> {
        let max = state.cfg.max_concurrent;
        if state.in_flight.fetch_add(1, Ordering::SeqCst) >= max {
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::busy(max));
        }
        Ok(Slot(state.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket or thread could not be set up.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The chat template cannot be built.
    #[error("{0}")]
    Template(#[from] whet_infer::TemplateError),
    /// A setting is out of range.
    #[error("{0}")]
    Config(String),
}

/// Serve `model` on `listener` until `shutdown` resolves; requests in flight then finish.
/// The model's named adapters (see [`Llama::add_named_lora`]) are served under their names,
/// each with the weight it was added with.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: ServeConfig,
    model: Llama,
    tokenizer: ModelTokenizer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    if cfg.max_concurrent == 0 || cfg.max_tokens == 0 || cfg.engine.max_batch == 0 {
        return Err(Error::Config(
            "--max-concurrent, --max-tokens and --max-batch must be positive".into(),
        ));
    }
    let adapter_root = match &cfg.adapter_dir {
        Some(dir) => Some(
            std::fs::canonicalize(dir)
                .map_err(|e| Error::Config(format!("--adapter-dir {}: {e}", dir.display())))?,
        ),
        None => None,
    };
    let template = whet_infer::chat_template(&tokenizer)?;
    let now = unix_now();
    let adapters = model
        .adapter_weights()
        .into_iter()
        .map(|(name, weight)| AdapterEntry { name, weight, created: now })
        .collect();
    let (context, vocab) = (model.config().max_position_embeddings, model.config().vocab_size);
    let tokenizer = Arc::new(tokenizer);
    let (tx, engine) = worker::spawn(model, tokenizer.clone(), cfg.engine)?;
    let state = Arc::new(AppState {
        cfg,
        adapter_root,
        tokenizer,
        template,
        context,
        vocab,
        created: now,
        adapters: RwLock::new(adapters),
        engine: tx,
        in_flight: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
    });
    let app = routes::router(state.clone());
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!("serving on http://{}", addr.map_or("?".into(), |a| a.to_string()));
    conn::serve(listener, app, state.cfg.net, shutdown).await?;
    // The engine thread ends once the last sender is gone and its sequences are done.
    drop(state);
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    Ok(())
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
