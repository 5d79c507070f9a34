//! `whet data pairs`: preference pairs from an SFT set, the model's own answers rejected.

use crate::args::PairsArgs;
use crate::model;
use crate::output::{Output, Shape};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use whet_eval::pairs::{make_pairs, PairSettings};
use whet_eval::run::Prompting;

/// The splits of `path` that exist: a directory's train/valid/test.jsonl, or one file as train.
fn splits(path: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
    if !path.is_dir() {
        anyhow::ensure!(path.is_file(), "{}: no such file or directory", path.display());
        return Ok(vec![("train", path.to_path_buf())]);
    }
    let found: Vec<_> = ["train", "valid", "test"]
        .into_iter()
        .map(|s| (s, path.join(format!("{s}.jsonl"))))
        .filter(|(_, p)| p.is_file())
        .collect();
    if found.is_empty() {
        bail!("{}: no train.jsonl, valid.jsonl or test.jsonl", path.display());
    }
    Ok(found)
}

pub fn run(a: PairsArgs) -> Result<()> {
    let splits = splits(&a.path)?;
    let dir = if a.path.is_dir() {
        a.path.clone()
    } else {
        a.path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let mut inputs: Vec<(&str, &Path)> = vec![("data", a.path.as_path())];
    let model_paths = model::input_paths(&a.model);
    inputs.extend(model_paths.iter().map(|(f, p)| (*f, p.as_path())));
    let out = Output::plan(&a.out, Shape::Dir, "data pairs", a.overwrite, &inputs)?;
    // Every split is read (and every bad line named) before the model loads.
    let mut examples = vec![];
    for (name, path) in &splits {
        examples.push((*name, whet_eval::read_examples(path)?));
    }
    let rules_path = dir.join("rules.toml");
    let rules =
        rules_path.is_file().then(|| whet_eval::rules::Rules::read(&rules_path)).transpose()?;
    let filter = if a.only_failing {
        let metric = match &a.metric {
            Some(m) => m.clone(),
            None if rules.is_some() => "rules".to_string(),
            None => {
                let refs: Vec<String> = examples
                    .iter()
                    .flat_map(|(_, e)| e.iter().map(|x| x.reference.clone()))
                    .collect();
                let task = whet_eval::Task::detect(&refs);
                whet_eval::choose_metrics(&[], task, None)?.remove(0)
            }
        };
        // Checked as whet eval checks --metric: an unknown name, or `rules` without a file.
        whet_eval::choose_metrics(
            std::slice::from_ref(&metric),
            whet_eval::Task::Text,
            rules.as_ref(),
        )?;
        Some((metric, a.threshold))
    } else {
        None
    };
    let (m, _device) = model::load(&a.model, 0)?;
    let template = whet_infer::chat_template(&m.tokenizer)?;
    let model = whet_eval::run::Model {
        model: m.model,
        tokenizer: m.tokenizer,
        template,
        source: m.source,
    };
    let prompting = Prompting { adapters: model.model.adapter_weights(), ..Prompting::default() };
    let settings = PairSettings {
        sampling: whet_infer::SamplingConfig {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
            ..whet_infer::SamplingConfig::default()
        },
        max_tokens: a.max_tokens,
        max_batch: a.max_batch,
        filter: filter.clone(),
    };
    let staging = out.staging()?;
    let mut report = std::io::stdout().lock();
    let mut total = 0;
    for (name, examples) in &examples {
        eprintln!("{name}: sampling {} answers with {} ...", examples.len(), model.source);
        let (pairs, dropped) = make_pairs(&model, &prompting, examples, &settings, rules.as_ref())?;
        let path = staging.join(format!("{name}.jsonl"));
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path)
                .with_context(|| format!("cannot write {}", path.display()))?,
        );
        for p in &pairs {
            writeln!(file, "{}", p.to_json())?;
        }
        file.flush()?;
        let passing = match &filter {
            Some((metric, t)) => format!(", {} scoring {t} or more on {metric}", dropped.passing),
            None => String::new(),
        };
        writeln!(
            report,
            "{name}: {} examples -> {} pairs (dropped {}: {} empty answers, {} the same as the reference{passing})",
            examples.len(),
            pairs.len(),
            dropped.total(),
            dropped.empty,
            dropped.same,
        )?;
        total += pairs.len();
    }
    if total == 0 {
        bail!(
            "no pairs: the model's answers were empty, the references themselves{}; nothing written to {}\nhint: raise --temperature, or drop --only-failing",
            if filter.is_some() { ", or passed --only-failing's check" } else { "" },
            a.out.display()
        );
    }
    writeln!(report, "wrote {}", out.commit()?.display())?;
    Ok(())
}
