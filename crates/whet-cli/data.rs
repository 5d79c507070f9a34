//! `whet data check | preview | prepare` and `whet bench data`.

use crate::args::{BenchDataArgs, DataArgs, PrepareArgs, PreviewArgs};
use crate::model::model_spec;
use crate::output::{Output, Shape};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::time::Instant;
use whet_data::cache::{sha256_hex, Manifest, SplitInfo, CACHE_VERSION};
use whet_data::dataset::{self, PreparedSplit};
use whet_data::{ChatTemplate, Format, Overlong, Renderer, TrainOn};
use whet_model::ModelTokenizer;

/// The model's tokenizer and chat template, loaded without its weights.
pub(crate) struct ModelText {
    tokenizer: ModelTokenizer,
    template: ChatTemplate,
    end_of_turn: Vec<String>,
}

impl ModelText {
    fn load(a: &DataArgs) -> Result<Self> {
        let spec = model_spec(&a.model);
        let tokenizer = whet_model::load_tokenizer(&crate::model::source(&spec)?)
            .with_context(|| format!("cannot load the tokenizer of `{spec}`"))?;
        Self::from_tokenizer(tokenizer, &a.template.template_var)
    }

    /// Around a tokenizer already loaded with its model; `template_vars` are `NAME=VALUE`.
    pub(crate) fn from_tokenizer(
        tokenizer: ModelTokenizer,
        template_vars: &[String],
    ) -> Result<Self> {
        let mut template = whet_infer::chat_template(&tokenizer)?;
        template.set_vars(template_vars).map_err(anyhow::Error::msg)?;
        let end_of_turn = tokenizer
            .stop_ids
            .iter()
            .filter_map(|id| tokenizer.tokenizer.id_to_token(*id))
            .collect();
        Ok(Self { tokenizer, template, end_of_turn })
    }

    /// sha256 of the tokenizer and of the chat template: what a prepared dataset must match.
    pub(crate) fn hashes(&self) -> Result<(String, String)> {
        let json = self
            .tokenizer
            .tokenizer
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
        let template = self.tokenizer.chat_template.as_deref().unwrap_or(whet_data::CHATML);
        Ok((sha256_hex(json.as_bytes()), sha256_hex(template.as_bytes())))
    }

    fn renderer(&self, train_on: TrainOn) -> Renderer<'_> {
        Renderer::new(&self.tokenizer.tokenizer, &self.template, train_on, self.end_of_turn.clone())
    }
}

pub(crate) struct Settings {
    format: Option<Format>,
    train_on: TrainOn,
    overlong: Overlong,
}

fn settings(a: &DataArgs) -> Result<Settings> {
    let (format, train_on, overlong) = (a.shape.format().format(), a.train_on, a.shape.overlong());
    anyhow::ensure!(a.max_seq_len > 1, "--max-seq-len must be at least 2, got `{}`", a.max_seq_len);
    anyhow::ensure!(
        (0.0..1.0).contains(&a.valid_fraction),
        "--valid-fraction must be in [0, 1), got `{}`",
        a.valid_fraction
    );
    Ok(Settings { format, train_on, overlong })
}

/// Read, split, render, mask and tokenize.
pub(crate) fn run_pipeline(a: &DataArgs, m: &ModelText) -> Result<(Settings, Vec<PreparedSplit>)> {
    let s = settings(a)?;
    let mut splits = dataset::read(&a.path, s.format)?;
    dataset::split_valid(&mut splits, a.valid_fraction, a.seed);
    let prepared = dataset::prepare(&splits, &m.renderer(s.train_on), a.max_seq_len, s.overlong)?;
    // A filter that leaves a split empty is a mistake to say, not an empty cache to write.
    if let Some(p) = prepared.iter().find(|p| p.examples.is_empty() && p.dropped > 0) {
        bail!(
            "{}: all {} examples are longer than --max-seq-len {} and were dropped (--overlong drop)\nhint: raise --max-seq-len, or pass --overlong truncate",
            p.path.display(),
            p.dropped,
            a.max_seq_len
        );
    }
    Ok((s, prepared))
}

pub fn check(a: DataArgs) -> Result<()> {
    let m = ModelText::load(&a)?;
    let (_, splits) = run_pipeline(&a, &m)?;
    let mut out = std::io::stdout().lock();
    for split in &splits {
        let lens: Vec<usize> = split.examples.iter().map(|e| e.ids.len()).collect();
        let tokens = split.tokens();
        writeln!(
            out,
            "{} ({}, {}): {} examples",
            split.name,
            split.path.display(),
            split.format.name(),
            split.examples.len()
        )?;
        if lens.is_empty() {
            continue;
        }
        let max = *lens.iter().max().unwrap_or(&0);
        writeln!(
            out,
            "  tokens: {tokens} (mean {:.1}, max {max}); trained: {} ({:.1}%)",
            tokens as f64 / lens.len() as f64,
            split.trained_tokens(),
            100.0 * split.trained_tokens() as f64 / tokens.max(1) as f64
        )?;
        writeln!(
            out,
            "  over --max-seq-len {}: {} truncated, {} dropped",
            a.max_seq_len, split.truncated, split.dropped
        )?;
        if split.format == Format::Preference {
            let rejected: usize = split
                .examples
                .iter()
                .filter_map(|e| e.rejected.as_ref())
                .map(|r| r.trained())
                .sum();
            writeln!(
                out,
                "  pairs: {} (rejected answers: {rejected} trained tokens); chosen = rejected: {}",
                split.examples.len(),
                split.identical
            )?;
        }
        let mut seen: HashMap<&[u32], usize> = HashMap::new();
        let mut duplicates = vec![];
        for (e, line) in split.examples.iter().zip(&split.lines) {
            match seen.get(e.ids.as_slice()) {
                Some(first) => duplicates.push(format!("line {line} = line {first}")),
                None => {
                    seen.insert(&e.ids, *line);
                }
            }
        }
        writeln!(
            out,
            "  duplicates: {}{}",
            duplicates.len(),
            if duplicates.is_empty() {
                String::new()
            } else {
                format!(" ({})", duplicates.iter().take(5).cloned().collect::<Vec<_>>().join(", "))
            }
        )?;
        writeln!(out, "  length histogram (tokens):")?;
        for (lo, hi, n) in histogram(&lens, 8) {
            let bar = "#".repeat((40 * n).div_ceil(lens.len()).min(40));
            writeln!(out, "    {lo:>6}-{hi:<6} {n:>6} {bar}")?;
        }
        let mut longest: Vec<(usize, usize)> =
            lens.iter().copied().zip(split.lines.iter().copied()).collect();
        longest.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
        let top: Vec<String> =
            longest.iter().take(3).map(|(n, l)| format!("line {l} ({n} tokens)")).collect();
        writeln!(out, "  longest: {}", top.join(", "))?;
    }
    Ok(())
}

/// `buckets` equal-width buckets over the lengths: (low, high, count).
fn histogram(lens: &[usize], buckets: usize) -> Vec<(usize, usize, usize)> {
    let (min, max) = (*lens.iter().min().unwrap_or(&0), *lens.iter().max().unwrap_or(&0));
    let width = ((max - min) / buckets + 1).max(1);
    let mut counts = vec![0; buckets];
    for &l in lens {
        counts[((l - min) / width).min(buckets - 1)] += 1;
    }
    counts
        .into_iter()
        .enumerate()
        .filter(|(_, n)| *n > 0)
        .map(|(i, n)| (min + i * width, min + (i + 1) * width - 1, n))
        .collect()
}

pub fn preview(a: PreviewArgs) -> Result<()> {
    let m = ModelText::load(&a.data)?;
    let s = settings(&a.data)?;
    let mut splits = dataset::read(&a.data.path, s.format)?;
    dataset::split_valid(&mut splits, a.data.valid_fraction, a.data.seed);
    let Some(split) = splits.iter().find(|x| x.name == a.split) else {
        bail!(
            "no `{}` split in {}; splits: {}",
            a.split,
            a.data.path.display(),
            splits.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    };
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let renderer = m.renderer(s.train_on);
    let mut out = std::io::stdout().lock();
    if !color {
        writeln!(out, "(trained text is shown between « and »)")?;
    }
    for record in split.records.iter().take(a.count) {
        let at = |e: String| anyhow::anyhow!("{}:{}: {e}", split.path.display(), record.line);
        // A preference pair shows both answers, each after the prompt, with its mask.
        let sides = match &record.example {
            whet_data::Example::Preference { prompt, chosen, rejected } => vec![
                (" (chosen)", record.example.clone()),
                (
                    " (rejected)",
                    whet_data::Example::Preference {
                        prompt: prompt.clone(),
                        chosen: rejected.clone(),
                        rejected: chosen.clone(),
                    },
                ),
            ],
            whet_data::Example::Unpaired { desirable, .. } => vec![(
                if *desirable { " (desirable)" } else { " (undesirable)" },
                record.example.clone(),
            )],
            e => vec![("", e.clone())],
        };
        for (side, example) in sides {
            let enc = renderer.encode(&example).map_err(at)?;
            let t = &enc.tokens;
            writeln!(
                out,
                "── {}:{}{side} — {} tokens, {} trained ──",
                split.path.display(),
                record.line,
                t.ids.len(),
                t.trained()
            )?;
            show(&mut out, &enc, color, a.tokens)?;
        }
    }
    Ok(())
}

/// One encoded example's text, its trained tokens marked (colour, or « and »).
fn show(out: &mut impl Write, enc: &whet_data::Encoded, color: bool, tokens: bool) -> Result<()> {
    let t = &enc.tokens;
    let mut shown = 0; // bytes of text already printed
    let mut in_trained = false;
    for (i, &(_, end)) in enc.offsets.iter().enumerate() {
        // Tokens of one multi-byte character share its offsets; print it once. Offsets leave
        // out a token's leading space, so each piece runs from the end of the last one.
        if end <= shown {
            continue;
        }
        let piece = &enc.text[shown..end];
        shown = end;
        let trained = t.mask[i] == 1;
        let piece = if tokens { format!("⟨{piece}⟩") } else { piece.to_string() };
        if color {
            // Trained: bold green; masked: dim.
            let style = if trained { "\x1b[1;32m" } else { "\x1b[2m" };
            write!(out, "{style}{piece}\x1b[0m")?;
        } else {
            if trained != in_trained {
                write!(out, "{}", if trained { "«" } else { "»" })?;
                in_trained = trained;
            }
            write!(out, "{piece}")?;
        }
    }
    if in_trained {
        write!(out, "»")?;
    }
    writeln!(out)?;
    Ok(())
}

pub fn prepare(a: PrepareArgs) -> Result<()> {
    let mut inputs = vec![("--data", a.data.path.as_path())];
    let model = a.data.model.as_deref().map(std::path::Path::new).filter(|m| m.exists());
    inputs.extend(model.map(|m| ("--model", m)));
    let out = Output::plan(&a.out, Shape::Dir, "data prepare", a.overwrite, &inputs)?;
    let m = ModelText::load(&a.data)?;
    let start = Instant::now();
    let (s, splits) = run_pipeline(&a.data, &m)?;
    let manifest = manifest(&a, &m, &s, &splits)?;
    let cache: Vec<(String, Vec<whet_data::Tokenized>)> =
        splits.iter().map(|x| (x.name.clone(), x.examples.clone())).collect();
    whet_data::cache::save(out.staging()?, &manifest, &cache)?;
    out.commit()?;
    let mut out = std::io::stdout().lock();
    for x in &splits {
        write!(
            out,
            "{}: {} examples, {} tokens, {} trained, {} truncated, {} dropped",
            x.name,
            x.examples.len(),
            x.tokens(),
            x.trained_tokens(),
            x.truncated,
            x.dropped
        )?;
        if a.pack {
            let rows = whet_data::pack::pack(&x.examples, a.data.max_seq_len);
            write!(
                out,
                "; packed into {} rows of {} ({:.1}% filled)",
                rows.len(),
                a.data.max_seq_len,
                100.0 * whet_data::pack::efficiency(&rows, a.data.max_seq_len)
            )?;
        }
        writeln!(out)?;
    }
    writeln!(out, "wrote {} in {:.2}s", a.out.display(), start.elapsed().as_secs_f64())?;
    Ok(())
}

fn manifest(
    a: &PrepareArgs,
    m: &ModelText,
    s: &Settings,
    splits: &[PreparedSplit],
) -> Result<Manifest> {
    let (tokenizer_sha256, template_sha256) = m.hashes()?;
    let settings: BTreeMap<String, String> = [
        ("model", model_spec(&a.data.model)),
        ("format", s.format.map_or("auto".into(), |f| f.name().into())),
        ("train_on", a.data.train_on.name().to_string()),
        ("max_seq_len", a.data.max_seq_len.to_string()),
        ("overlong", a.data.shape.overlong().name().to_string()),
        ("valid_fraction", a.data.valid_fraction.to_string()),
        ("seed", a.data.seed.to_string()),
        ("pack", a.pack.to_string()),
        ("template_vars", a.data.template.template_var.join("; ")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut infos = vec![];
    for x in splits {
        let bytes =
            std::fs::read(&x.path).with_context(|| format!("cannot read {}", x.path.display()))?;
        infos.push(SplitInfo {
            name: x.name.clone(),
            source: x.path.clone(),
            source_sha256: sha256_hex(&bytes),
            examples: x.examples.len(),
            tokens: x.tokens(),
            trained_tokens: x.trained_tokens(),
            truncated: x.truncated,
            dropped: x.dropped,
        });
    }
    Ok(Manifest {
        version: CACHE_VERSION,
        tokenizer_sha256,
        template_sha256,
        settings,
        splits: infos,
    })
}

pub fn bench(a: BenchDataArgs) -> Result<()> {
    anyhow::ensure!(a.examples > 0, "--examples must be positive");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("train.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for i in 0..a.examples {
        let rec = serde_json::json!({"messages": [
            {"role": "user", "content": format!("Customer message #{i}: my order {} has not arrived yet, what should I do?", 10_000 + i * 7)},
            {"role": "assistant", "content": format!("Sorry about order {}. I have checked it: it left our warehouse and should arrive within {} days.", 10_000 + i * 7, 1 + i % 5)},
        ]});
        writeln!(f, "{rec}")?;
    }
    f.flush()?;
    drop(f);
    let load_before = whet_infer::bench::load_average();
    let out = dir.path().join("prepared");
    let start = Instant::now();
    prepare(PrepareArgs {
        data: DataArgs {
            path,
            model: a.model.clone(),
            shape: Default::default(),
            template: Default::default(),
            train_on: whet_data::TrainOn::All,
            max_seq_len: 2048,
            valid_fraction: 0.0,
            seed: 0,
        },
        out,
        pack: false,
        overwrite: false,
    })?;
    let secs = start.elapsed().as_secs_f64();
    println!("examples:   {} two-turn chats, read + render + mask + tokenize + write", a.examples);
    println!("threads:    {}", std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!("speed:      {:.0} examples/s ({secs:.2}s)", a.examples as f64 / secs);
    println!("{}", whet_infer::bench::load_line(load_before));
    Ok(())
}
