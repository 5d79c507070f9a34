//! The engine thread: it owns the model and runs [`whet_infer::Engine`] steps while sequences
//! are running, taking new requests and adapter changes between steps. The HTTP handlers talk
//! to it through [`Command`]s only, so no lock is held across a forward pass.

use crate::Slot;
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::{mpsc as tmpsc, oneshot};
use whet_infer::{Engine, EngineConfig, Event, Request};
use whet_model::adapter::AdapterFiles;
use whet_model::{Llama, ModelTokenizer};

pub(crate) enum Command {
    /// Queue a request; `accepted` says whether the engine took it, its events go to
    /// `events` (dropping the receiver cancels it).
    /// The request's slot is dropped with its events: when its sequence has ended.
    Generate {
        request: Request,
        events: tmpsc::UnboundedSender<Event>,
        accepted: oneshot::Sender<Result<(), whet_infer::Error>>,
        slot: Arc<Slot>,
    },
    /// Attach a PEFT adapter, already read from its files, as the named adapter `name`.
    Load {
        name: String,
        files: Box<AdapterFiles>,
        weight: f64,
        reply: oneshot::Sender<Result<(), whet_model::Error>>,
    },
    /// Remove adapter `name`; its running sequences fail.
    Unload { name: String, reply: oneshot::Sender<Result<(), whet_model::Error>> },
}

/// Start the engine thread; it ends when every sender of the returned channel is dropped and
/// its last sequence has finished.
pub(crate) fn spawn(
    mut model: Llama,
    tokenizer: Arc<ModelTokenizer>,
    cfg: EngineConfig,
) -> std::io::Result<(mpsc::Sender<Command>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Command>();
    let handle = std::thread::Builder::new().name("whet-engine".into()).spawn(move || {
        let mut engine = Engine::new(cfg);
        let mut open = true;
        while open || !engine.is_empty() {
            // Wait while idle; between steps take whatever has arrived.
            let mut next = if engine.is_empty() { rx.recv().ok() } else { None };
            if next.is_none() && engine.is_empty() {
                open = false;
                continue;
            }
            loop {
                let cmd = match next.take() {
                    Some(c) => c,
                    None => match rx.try_recv() {
                        Ok(c) => c,
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    },
                };
                handle(cmd, &mut engine, &mut model);
            }
            engine.step(&model, &tokenizer);
        }
    })?;
    Ok((tx, handle))
}

fn handle(cmd: Command, engine: &mut Engine, model: &mut Llama) {
    match cmd {
        Command::Generate { request, events, accepted, slot } => {
            let sink = Box::new(move |e| {
                let _slot = &slot;
                events.send(e).is_ok()
            });
            let _ = accepted.send(engine.submit(model, request, sink));
        }
        Command::Load { name, files, weight, reply } => {
            let _ = reply.send(files.attach(model, Some((&name, weight))).map(|_| ()));
        }
        Command::Unload { name, reply } => {
            engine.fail_adapter(&name);
            let _ = reply.send(model.remove_named_lora(&name));
        }
    }
}
