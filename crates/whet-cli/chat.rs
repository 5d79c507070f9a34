//! `whet chat`: an interactive conversation that keeps its history (and KV cache) across turns.

use crate::args::ChatArgs;
use crate::model;
use anyhow::Result;
use std::io::{BufRead, IsTerminal, Write};
use whet_infer::{chat_template, Message, Session};

const HELP: &str = "commands: /reset clears the conversation, /adapter NAME|all|none switches adapters (those given as --adapter NAME=DIR), /quit (or Ctrl-D) leaves";

pub fn run(args: ChatArgs) -> Result<()> {
    let cfg = model::generate_config(&args.sampling)?;
    let (m, _device) = model::load(&args.model, args.sampling.seed)?;
    let mut template = chat_template(&m.tokenizer)?;
    template.set_vars(&args.template.template_var).map_err(anyhow::Error::msg)?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("whet chat with {}\n{HELP}", m.source);
    }
    let start = || args.system.iter().map(|s| Message::new("system", s)).collect::<Vec<_>>();
    let mut history = start();
    // `/adapter all` restores the weights the command line gave.
    let given = m.model.adapter_weights();
    let mut session = Session::new(&m.model, &m.tokenizer);
    let mut stdout = std::io::stdout().lock();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().split(b'\n');
    let mut number = 0;
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        number += 1;
        // A line that is not UTF-8 (a terminal in another encoding, a pasted binary) is
        // refused on its own; the conversation goes on.
        let line = match String::from_utf8(line?) {
            Ok(l) => l,
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                eprintln!(
                    "error: input line {number} is not valid UTF-8 (byte {:#04x} at column {}); it was not sent",
                    e.as_bytes()[at],
                    at + 1
                );
                continue;
            }
        };
        let input = line.trim();
        match input {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history = start();
                session.reset();
                if interactive {
                    eprintln!("(conversation cleared)");
                }
                continue;
            }
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            _ => {}
        }
        if let Some(name) = input.strip_prefix("/adapter").map(str::trim) {
            // The cached keys and values were computed with the old adapters: start over on
            // the same history.
            let weights: Vec<(&str, f64)> = match name {
                "none" => vec![],
                "all" => given.iter().map(|(n, w)| (n.as_str(), *w)).collect(),
                n => vec![(n, given.iter().find(|(g, _)| g == n).map_or(1.0, |(_, w)| *w))],
            };
            match m.model.set_adapter_weights(&weights) {
                Ok(()) => {
                    session.reset();
                    if interactive {
                        eprintln!("(adapter: {name})");
                    }
                }
                Err(e) => eprintln!("error: {e}"),
            }
            continue;
        }
        history.push(Message::new("user", input));
        let prompt = template.render(&history, true)?;
        let ids = m.tokenizer.encode(&prompt)?;
        let mut write_err = None;
        let g = session.generate(&ids, &cfg, |piece| {
            if write_err.is_none() {
                write_err = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush()).err();
            }
        })?;
        if let Some(e) = write_err {
            return Err(e.into());
        }
        writeln!(stdout)?;
        history.push(Message::new("assistant", g.text.trim()));
    }
    Ok(())
}
