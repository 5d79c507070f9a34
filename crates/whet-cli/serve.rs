//! `whet serve`: load the model and its adapters, then hand them to whet-serve.

use crate::args::ServeArgs;
use crate::model;
use anyhow::{Context, Result};

pub fn run(args: ServeArgs) -> Result<()> {
    let defaults = model::generate_config(&args.sampling)?;
    if let Some(dir) = &args.adapter_dir {
        anyhow::ensure!(dir.is_dir(), "--adapter-dir {}: no such directory", dir.display());
    }
    let (m, _device) = model::load_with(&args.model, args.sampling.seed, false)?;
    let model_id = args.model_id.clone().unwrap_or_else(|| default_id(&args.model.model));
    let cfg = whet_serve::ServeConfig {
        model_id,
        api_key: args.api_key.clone(),
        adapter_dir: args.adapter_dir.clone(),
        max_concurrent: args.max_concurrent,
        max_tokens: args.sampling.max_tokens,
        max_body_bytes: args.max_body_bytes,
        engine: whet_infer::EngineConfig {
            max_batch: args.max_batch,
            ..whet_infer::EngineConfig::default()
        },
        defaults,
        net: whet_serve::NetConfig {
            idle_timeout: std::time::Duration::from_secs_f64(args.idle_timeout),
            body_timeout: std::time::Duration::from_secs_f64(args.body_timeout),
            max_connections: args.max_connections,
            ..whet_serve::NetConfig::default()
        },
        allowed_hosts: args.allowed_hosts.clone(),
        cors_origins: args.cors_origins.clone(),
    };
    anyhow::ensure!(
        cfg.net.max_connections != Some(0),
        "--max-connections 0: the server needs at least one connection"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let names = m.model.adapter_names();
        eprintln!(
            "whet serve: {} as `{}`{} on http://{local}/ (playground) and http://{local}/v1",
            m.source,
            cfg.model_id,
            if names.is_empty() {
                String::new()
            } else {
                format!(", adapters: {}", names.join(", "))
            },
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("whet serve: shutting down (requests in flight finish first)");
        };
        whet_serve::serve(listener, cfg, m.model, m.tokenizer, shutdown).await?;
        Ok(())
    })
}

/// The base model's id: the model file's or directory's name, or the spec itself.
fn default_id(spec: &Option<String>) -> String {
    let spec = model::model_spec(spec);
    let path = std::path::Path::new(&spec);
    if path.exists() {
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            return stem.to_string();
        }
    }
    spec
}
