//! Command-line arguments. Each default has one source: the `default_value` here.

use clap::{Args, Parser, Subcommand};

/// whet: fine-tune small Llama-class models locally with LoRA, and use them.
#[derive(Debug, Parser)]
#[command(name = "whet", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug); `WHET_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt.
    ///
    /// Example: whet generate --chat --prompt "What is the capital of France?"
    Generate(GenerateArgs),
    /// Chat interactively; `/reset` clears the history, `/quit` leaves.
    ///
    /// Example: whet chat --system "You are terse."
    Chat(ChatArgs),
    /// Describe a model: architecture, parameters, tokenizer, chat template.
    ///
    /// Example: whet info random:tiny
    Info(InfoArgs),
    /// Show how the model's tokenizer splits a text: each token's id and text, or `--ids`.
    ///
    /// Example: whet tokenize "In 2024, 12345 llamas"   (also on a vocabulary-only GGUF)
    Tokenize(TokenizeArgs),
    /// Train a LoRA adapter.
    ///
    /// Example: whet train --data data/support-style --out runs/style --steps 100
    ///
    /// Settings come from --config (a TOML file with the same names as whet.toml), then the
    /// flags; a resumed run reads RUN_DIR/whet.toml and refuses settings that differ.
    Train(TrainArgs),
    /// Check, preview and prepare datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Fold an adapter into the base weights and write the merged model.
    ///
    /// Example: whet merge --adapter runs/style/adapter --out runs/style/merged
    Merge(MergeArgs),
    /// Inspect LoRA adapters (whet's or PEFT's).
    #[command(subcommand)]
    Adapter(AdapterCommand),
    /// Score a model (with adapters, a system prompt, few-shot examples) on held-out data.
    ///
    /// Example: whet eval --adapter runs/intents/adapter --data data/intents
    ///
    /// The metric follows the references (labels: accuracy; JSON: field match and validity;
    /// free text: chrF and ROUGE-L; rules.toml beside the data: rule adherence), each mean with
    /// a seeded bootstrap 95% interval, and the loss and perplexity of the references.
    Eval(EvalArgs),
    /// Fine-tuned against prompted, on the same held-out data: metric, consistency, prompt
    /// tokens, latency, cost, and a verdict.
    ///
    /// Example: whet compare --data data/intents --adapter runs/intents/adapter --system-prompt-file prompt.txt --shots 0,3,5
    Compare(CompareArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, with per-request adapters.
    ///
    /// Example: whet serve --adapter style=runs/style/adapter --port 8080
    ///
    /// Each request's `model` picks the base model (its id is in GET /v1/models) or an
    /// adapter by NAME; requests on different adapters decode in the same batch. The
    /// playground page is at http://HOST:PORT/.
    Serve(ServeArgs),
    /// Label unlabelled inputs with a prompted teacher model, as a chat dataset a small
    /// student can be trained on (`whet train --data OUT`).
    ///
    /// Example: whet distill --teacher models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --inputs reviews.txt --system-prompt-file prompt.txt --labels positive,negative --out data/distilled
    ///
    /// The student's data holds the bare inputs and the teacher's answers: the teacher's
    /// system prompt and shots are not copied into it. Answers are kept beside --out as they
    /// come, so a stopped run continues where it stopped, and a run with the same teacher
    /// settings asks the teacher nothing again.
    Distill(DistillArgs),
    /// Benchmarks (speed goals live here, not in tests).
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// What eval and compare share.
#[derive(Debug, Args)]
pub struct EvalShared {
    /// A test file, or a data directory (its test.jsonl is used).
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// The system prompt of the prompted arms.
    #[arg(long, conflicts_with = "system_prompt_file")]
    pub system_prompt: Option<String>,
    /// A file holding that system prompt.
    #[arg(long)]
    pub system_prompt_file: Option<std::path::PathBuf>,
    /// Metrics to report (repeatable; the first ranks): accuracy, exact_match, chrf, rouge_l,
    /// json_valid, json_fields, rules. Default: the task's.
    #[arg(long)]
    pub metric: Vec<String>,
    /// Write report.json, report.md, report.html and the plots into this directory.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Replace --out if an earlier run of the same command wrote it.
    #[arg(long, requires = "out")]
    pub overwrite: bool,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampled runs per example, for consistency across seeds (0 or 1: off).
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Temperature of those runs.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// top-p of those runs.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Examples timed one at a time for latency.
    #[arg(long, default_value_t = 8)]
    pub latency_samples: usize,
    /// Most sequences generated at once.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Seed of few-shot draws and of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Score only the first N test examples: a quicker, wider-interval look (the report
    /// records N).
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub shared: EvalShared,
    /// Few-shot examples from the data directory's train.jsonl.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// On preference pairs: weigh the adapters against the base with this adapter (the one a
    /// DPO run started from, its `--init-adapter`) instead of the bare base.
    #[arg(long, value_name = "DIR")]
    pub reference_adapter: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The base model (same forms as --model elsewhere).
    #[arg(short, long, env = "WHET_MODEL")]
    pub model: Option<String>,
    /// The fine-tuned adapter (a run's adapter/ directory, or any PEFT adapter): `DIR`, or
    /// `NAME=DIR` repeated to put several side by side (`--adapter sft=runs/sft/adapter
    /// --adapter dpo=runs/dpo/adapter`), each against the first by a paired bootstrap.
    #[arg(long, required = true, value_name = "[NAME=]DIR")]
    pub adapter: Vec<String>,
    /// A larger model, prompted like the best prompted arm.
    #[arg(long)]
    pub baseline_model: Option<String>,
    #[command(flatten)]
    pub shared: EvalShared,
    /// Few-shot counts to try; the best on valid.jsonl is chosen, all are reported.
    #[arg(long, value_delimiter = ',', default_value = "0,3")]
    pub shots: Vec<usize>,
    /// Draws of the few-shot examples to try for each k > 0 (seeds SEED, SEED + 1, ...): the
    /// best on valid.jsonl runs on the test set, and the draws' spread is reported.
    #[arg(long, default_value_t = 1)]
    pub shot_draws: usize,
    /// Price per 1,000 tokens (prompt + answer), for cost per 1M queries; without it, cost
    /// is machine-hours.
    #[arg(long)]
    pub price_per_1k_tokens: Option<f64>,
    /// Train adapters on growing subsets of train.jsonl (sizes, or `all`), with the adapter's
    /// run settings (its whet.toml) and seed, into OUT/learning-curve/N/, and plot the metric
    /// against the number of examples beside the best prompted arm.
    #[arg(long, value_delimiter = ',', requires = "out")]
    pub learning_curve: Vec<String>,
    #[arg(long, default_value_t = whet_model::DeviceSpec::Auto)]
    pub device: whet_model::DeviceSpec,
    #[arg(long, value_enum, default_value_t = whet_model::WeightDType::F32)]
    pub dtype: whet_model::WeightDType,
    /// Quantize the base's linear layers and embedding for every arm alike (`q8_0` or
    /// `q4_0`): the adapter stays f32 beside them, and CPU decoding runs 2-3x faster.
    #[arg(long, value_enum)]
    pub quantize: Option<whet_model::Quantization>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Defaults for requests that do not set them; `--max-tokens` is also the most a request
    /// may ask for.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The id the base model answers to; default: the model file's name.
    #[arg(long)]
    pub model_id: Option<String>,
    /// Allow POST /v1/adapters to load adapters from inside this directory (only).
    #[arg(long)]
    pub adapter_dir: Option<std::path::PathBuf>,
    /// Address to bind; 127.0.0.1 keeps the server to this machine.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health and the page at /.
    #[arg(long, env = "WHET_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most requests in flight (decoding or queued); more get HTTP 429.
    #[arg(long, default_value_t = 64)]
    pub max_concurrent: usize,
    /// Most sequences decoding in one batch.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Largest request body in bytes; larger gets HTTP 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// A host name clients may reach the server by (repeatable; `*`: any). IP addresses and
    /// `localhost` always work; any other `Host` header gets HTTP 403, which stops web pages
    /// that rebind their DNS name to this machine.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// A web origin whose pages may call the API, e.g. `https://app.example` (repeatable;
    /// `*`: any). Without it no CORS header is sent and cross-site browser requests get 403.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Seconds a connection may stay open with no request in progress (before its first
    /// request, while its header arrives, or kept alive after a response).
    #[arg(long, default_value_t = whet_serve::NetConfig::default().idle_timeout.as_secs_f64(), value_parser = positive_secs)]
    pub idle_timeout: f64,
    /// Seconds a request body may take to arrive after its header; slower gets HTTP 408.
    #[arg(long, default_value_t = whet_serve::NetConfig::default().body_timeout.as_secs_f64(), value_parser = positive_secs)]
    pub body_timeout: f64,
    /// Most open connections; at the cap a new one closes the one idle longest. Default: the
    /// descriptor limit (raised to its hard limit) less 256.
    #[arg(long)]
    pub max_connections: Option<usize>,
}

/// A positive, finite number of seconds.
fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds between 0 and 86400")),
    }
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model, device and precision, and the adapter to merge (`--adapter`, required).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to write: a Hugging Face model directory (config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json with the chat template, generation_config.json),
    /// or with `--format gguf` a .gguf file.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// `hf`: a Hugging Face directory; `gguf`: one GGUF file for llama.cpp (from a GGUF base,
    /// whose tokenizer and metadata it keeps).
    #[arg(long, default_value = "hf")]
    pub format: String,
    /// GGUF weight type: `f32`, `f16`, `q8_0` or `q4_0` (matrices; norms stay f32).
    #[arg(long, default_value = "f32")]
    pub quant: String,
    /// Replace --out if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Subcommand)]
pub enum AdapterCommand {
    /// Ranks, alphas, targets, adapted modules, parameter count, base model and size.
    ///
    /// Example: whet adapter info runs/style/adapter
    Info(AdapterInfoArgs),
    /// Write an adapter in another runtime's format: `--to gguf`, a llama.cpp LoRA adapter
    /// (`llama-cli -m base.gguf --lora FILE.gguf`).
    ///
    /// Example: whet adapter convert runs/style/adapter --to gguf --out style-lora.gguf
    Convert(AdapterConvertArgs),
    /// What a runtime will refuse or silently compute differently (exit 1 when it would
    /// misbehave): `--for whet|peft|vllm|llama.cpp|mistralrs`.
    ///
    /// Example: whet adapter check runs/style/adapter --for vllm
    Check(AdapterCheckArgs),
}

#[derive(Debug, Args)]
pub struct AdapterCheckArgs {
    /// The adapter directory.
    pub dir: std::path::PathBuf,
    /// The runtime.
    #[arg(long = "for", value_enum)]
    pub runtime: whet_model::adapter::Runtime,
}

#[derive(Debug, Args)]
pub struct AdapterConvertArgs {
    /// The adapter directory.
    pub dir: std::path::PathBuf,
    /// Target format; `gguf` (llama.cpp) is the one implemented.
    #[arg(long)]
    pub to: String,
    /// The file to write.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// The base model (its architecture and head counts shape the file) [default: the default model].
    #[arg(short, long, env = "WHET_MODEL")]
    pub model: Option<String>,
    /// Replace --out if it is a GGUF file.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct AdapterInfoArgs {
    /// The adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    pub dir: std::path::PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Validate a dataset and report counts, token lengths, trained fraction, duplicates and the
    /// longest examples; exits non-zero on any bad record.
    ///
    /// Example: whet data check data/support-style
    Check(DataArgs),
    /// Show examples exactly as the model will see them: trained tokens highlighted, masked ones
    /// dimmed.
    ///
    /// Example: whet data preview data/intents -n 2 --tokens
    Preview(PreviewArgs),
    /// Tokenize and mask once, into a cache directory that training reads.
    ///
    /// Example: whet data prepare data/intents --out runs/intents-data
    Prepare(PrepareArgs),
    /// Build preference pairs from an SFT set for DPO: chosen = each example's reference
    /// answer, rejected = the model's own sampled answer to the same prompt (batched),
    /// optionally kept only where that answer fails the dataset's rules.toml or a metric.
    ///
    /// Example: whet data pairs data/support-style --out runs/support-pairs --only-failing
    Pairs(PairsArgs),
}

#[derive(Debug, Args)]
pub struct PairsArgs {
    /// A JSONL file of chat examples with answers, or a directory with train.jsonl (and
    /// optionally valid.jsonl, test.jsonl): each split makes the pairs of the same name.
    pub path: std::path::PathBuf,
    /// The model whose answers are the rejected sides (an SFT adapter with --adapter).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output directory: train.jsonl (and valid.jsonl, test.jsonl) in TRL's preference format.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Replace --out if an earlier `whet data pairs` wrote it.
    #[arg(long)]
    pub overwrite: bool,
    /// Keep a pair only where the sampled answer fails: scores below --threshold on --metric
    /// (default: `rules` where the data has a rules.toml, else the task's metric).
    #[arg(long)]
    pub only_failing: bool,
    /// The metric of --only-failing: accuracy, exact_match, chrf, rouge_l, json_valid,
    /// json_fields or rules.
    #[arg(long, requires = "only_failing")]
    pub metric: Option<String>,
    /// The score an answer must stay below to be kept by --only-failing.
    #[arg(long, default_value_t = 1.0, requires = "only_failing")]
    pub threshold: f64,
    /// Most tokens per sampled answer.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature of the rejected answers (0: greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// top-p of the rejected answers.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Seed of the sampling: example i samples with SEED + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most sequences generated at once.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
}

/// Variables for the chat template.
#[derive(Debug, Clone, Default, Args)]
pub struct TemplateArgs {
    /// Set a chat-template variable, as transformers' `apply_chat_template(NAME=VALUE)` does
    /// (repeatable): `date_string=26 Jul 2024` pins the date Llama 3.x stamps into its system
    /// header, `enable_thinking=false` for Qwen3. VALUE is JSON when it parses, else a string.
    #[arg(long = "template-var", value_name = "NAME=VALUE")]
    pub template_var: Vec<String>,
}

/// A dataset and how to turn it into tokens.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// A JSONL file, or a directory with train.jsonl (and optionally valid.jsonl, test.jsonl).
    pub path: std::path::PathBuf,
    /// The model whose tokenizer and chat template are used (same forms as elsewhere).
    #[arg(short, long, env = "WHET_MODEL")]
    pub model: Option<String>,
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Which tokens the loss covers: `all` assistant turns, the `last` one, or `inputs` too.
    #[arg(long, value_enum, default_value_t)]
    pub train_on: whet_data::TrainOn,
    /// Longest example in tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Share of train.jsonl held out for validation when there is no valid.jsonl.
    #[arg(long, default_value_t = 0.1)]
    pub valid_fraction: f64,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// How records are read and what happens to overlong examples: one definition for `whet data`
/// and `whet train`.
#[derive(Debug, Clone, Default, Args)]
pub struct ShapeArgs {
    /// Record format [default: auto, detected per file from its first record].
    #[arg(long, value_enum)]
    pub format: Option<whet_data::FormatChoice>,
    /// Examples over --max-seq-len: `truncate` them or `drop` them [default: truncate].
    #[arg(long, value_enum)]
    pub overlong: Option<whet_data::Overlong>,
}

impl ShapeArgs {
    /// `--format`, or its default.
    pub fn format(&self) -> whet_data::FormatChoice {
        self.format.unwrap_or_default()
    }

    /// `--overlong`, or its default.
    pub fn overlong(&self) -> whet_data::Overlong {
        self.overlong.unwrap_or_default()
    }
}

#[derive(Debug, Args)]
pub struct PreviewArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// How many examples to show.
    #[arg(short = 'n', long, default_value_t = 3)]
    pub count: usize,
    /// Which split to show.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Show token boundaries (each token in ⟨ ⟩).
    #[arg(long)]
    pub tokens: bool,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Directory to write the prepared dataset to.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Record that training should pack several examples per row: `whet train` on this
    /// directory packs unless given --no-pack. Reports the packing efficiency.
    #[arg(long)]
    pub pack: bool,
    /// Replace --out if it already holds a prepared dataset.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s, medians over several runs, with the load average.
    ///
    /// Example: whet bench generate --model random:smollm2-135m --runs 5
    Generate(BenchGenerateArgs),
    /// `whet data prepare` speed on synthetic chat examples (examples/s).
    ///
    /// Example: whet bench data --examples 100000
    Data(BenchDataArgs),
    /// LoRA training speed and memory: tokens/s (median over steps) and peak RSS.
    ///
    /// Example: whet bench train --steps 5   (random:smollm2-135m, r8 on q,v, batch 4 x 128)
    Train(BenchTrainArgs),
    /// `whet serve` under concurrent load over loopback: one stream, N streams at once, then
    /// a burst of requests; tokens/s, requests/s, latency percentiles.
    ///
    /// Example: whet bench serve --streams 16 --requests 32
    Serve(BenchServeArgs),
    /// `whet eval` speed: held-out examples scored per second (batched greedy generation,
    /// stopping at end of turn).
    ///
    /// Example: whet bench eval --data data/intents --repeat 12
    Eval(BenchEvalArgs),
    /// `whet distill`'s labelling speed: inputs answered per second by the teacher one at a
    /// time, then batched through the engine (--max-batch) or, for an endpoint, --concurrency
    /// requests at once.
    ///
    /// Example: whet bench distill --teacher models/SmolLM2-135M-Instruct.Q4_1.gguf --inputs data/intents/test.jsonl
    Distill(BenchDistillArgs),
}

#[derive(Debug, Args)]
pub struct BenchDistillArgs {
    /// The teacher: a model, or an OpenAI-compatible endpoint URL (with --teacher-model).
    #[arg(long)]
    pub teacher: String,
    /// The model to ask an endpoint for.
    #[arg(long)]
    pub teacher_model: Option<String>,
    /// Unlabelled inputs, as `whet distill --inputs` reads them.
    #[arg(long)]
    pub inputs: std::path::PathBuf,
    /// Answer only the first N inputs.
    #[arg(long, default_value_t = 32)]
    pub limit: usize,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// A local teacher's batch, against 1.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// An endpoint's requests in flight, against 1.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
}

#[derive(Debug, Args)]
pub struct BenchEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A test file, or a data directory (its test.jsonl).
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// Score the test set this many times over (500 examples = 40 x 12 + ...).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Most sequences generated at once.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
}

#[derive(Debug, Args)]
pub struct BenchServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Concurrent streams of the aggregate-throughput round (compared with one stream).
    #[arg(long, default_value_t = 16)]
    pub streams: usize,
    /// Concurrent short chat requests of the last round.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Tokens each request generates (end-of-sequence ignored).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Most sequences decoding in one batch.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Model; the default has SmolLM2-135M's shapes with random weights.
    #[arg(short, long, default_value = "random:smollm2-135m")]
    pub model: String,
    /// Base weight dtype.
    #[arg(long, value_enum, default_value_t = whet_model::WeightDType::F32)]
    pub dtype: whet_model::WeightDType,
    /// Device.
    #[arg(long, default_value_t = whet_model::DeviceSpec::Auto)]
    pub device: whet_model::DeviceSpec,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Wrapped modules.
    #[arg(long, default_value = "q_proj,v_proj")]
    pub targets: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per sequence (random rows: all trained; --data: the most a row holds).
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    /// Measured steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Gradient checkpointing, as `whet train --grad-checkpoint`.
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// QLoRA, as `whet train --quantize-base`: `q8_0` or `q4_0`.
    #[arg(long, value_enum)]
    pub quantize_base: Option<whet_model::Quantization>,
    /// Train on a dataset (as `whet train --data`: its train split, tokenized with the model's
    /// template, the loss on what the model should learn) instead of random full rows; rows
    /// are cut at --seq-len.
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Pack --data's examples into rows of --seq-len tokens, as `whet train --pack`.
    #[arg(long)]
    pub pack: bool,
    /// The objective, as `whet train --objective`. Random rows for a preference objective are
    /// pairs: a prompt of --prompt-tokens shared by two different answers, each side --seq-len
    /// tokens (a pair runs two rows' tokens; tokens/s counts both); for KTO, answers marked
    /// desirable and undesirable in turn.
    #[arg(long, value_enum, default_value_t = whet_train::ObjectiveKind::Sft)]
    pub objective: whet_train::ObjectiveKind,
    /// Of each random row, the first N tokens are prompt: not trained (and a pair's sides
    /// share them). 0 trains every token (SFT only).
    #[arg(long, default_value_t = 0)]
    pub prompt_tokens: usize,
    /// As `whet train --precompute-ref` (DPO, IPO, KTO).
    #[arg(long)]
    pub precompute_ref: bool,
    /// Write the micro-batches trained (ids, loss mask, positions; one JSON line per batch,
    /// the warm-up's first; whole batches, by rank 0 under mpirun), for
    /// scripts/bench_train_torch.py --rows to train on the same tokens.
    #[arg(long)]
    pub save_rows: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchDataArgs {
    /// The model whose tokenizer and template are used.
    #[arg(short, long, env = "WHET_MODEL")]
    pub model: Option<String>,
    /// Number of synthetic two-turn chat examples.
    #[arg(long, default_value_t = 100_000)]
    pub examples: usize,
}

/// Which model, where, and in what precision.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face model directory, a hub id (`org/name`) or a random preset
    /// (`random:tiny`, `random:smollm2-135m`). Default: models/SmolLM2-135M-Instruct.Q4_1.gguf,
    /// fetched by scripts/fetch-model.sh.
    #[arg(short, long, env = "WHET_MODEL")]
    pub model: Option<String>,
    /// `auto` (CUDA or Metal when built in and present, else CPU), `cpu`, `cuda`, `cuda:N`, `metal`.
    #[arg(long, default_value_t = whet_model::DeviceSpec::Auto)]
    pub device: whet_model::DeviceSpec,
    /// Weight precision after loading: `f32`, `f16` or `bf16`.
    #[arg(long, value_enum, default_value_t = whet_model::WeightDType::F32)]
    pub dtype: whet_model::WeightDType,
    /// Quantize the linear layers and the embedding table for inference: `q8_0`
    /// (near-lossless) or `q4_0`. Decoding reads every weight per token, so this is what makes
    /// CPU decoding fast.
    #[arg(long, value_enum)]
    pub quantize: Option<whet_model::Quantization>,
    /// A LoRA adapter directory (PEFT format, e.g. RUN_DIR/adapter) to apply: `DIR` alone is
    /// merged into the weights (base-model speed); `NAME=DIR[:WEIGHT]`, repeatable, applies
    /// several unmerged beside the base, each scaled by WEIGHT (default 1); `whet chat`
    /// switches between them with `/adapter NAME`.
    #[arg(long)]
    pub adapter: Vec<String>,
}

/// How to sample and when to stop.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with this much probability (1 = all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Penalise tokens seen in the last 64 (1 = off; 1.1 is a common choice).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Seed for sampling (and for random presets' weights).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The prompt; read from stdin when absent or `-`.
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat); without it the template's default applies.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[command(flatten)]
    pub template: TemplateArgs,
    /// Print prompt/decode speed to stderr when done.
    #[arg(long)]
    pub stats: bool,
    /// Generate for every line of a JSONL file, batched, and write one JSON line per prompt to
    /// stdout. Each line: `{"prompt": TEXT}` or `{"messages": [...]}`, optionally with `id`
    /// (echoed), `adapter` (a NAME given as --adapter NAME=DIR, or `none`), `max_tokens`,
    /// `temperature`, `top_p`, `seed`, `stop`; other settings come from the flags.
    #[arg(long, conflicts_with = "prompt")]
    pub batch_file: Option<std::path::PathBuf>,
    /// Most sequences decoding at once with --batch-file.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// System message for the conversation; without it the template's default applies.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub template: TemplateArgs,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The model to describe (same forms as --model); default: the default model.
    pub model: Option<String>,
    /// Weight precision after loading.
    #[arg(long, value_enum, default_value_t = whet_model::WeightDType::F32)]
    pub dtype: whet_model::WeightDType,
    /// Print the whole chat template instead of its first line.
    #[arg(long)]
    pub template: bool,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// The text; read from stdin when absent or `-`.
    pub text: Option<String>,
    /// The model whose tokenizer is used (any --model form; a vocabulary-only GGUF works).
    #[arg(short, long, env = "WHET_MODEL")]
    pub model: Option<String>,
    /// Print only the ids, space-separated, on one line.
    #[arg(long)]
    pub ids: bool,
}

#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Measured runs (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

/// `whet train`: every setting of [`whet_train::TrainConfig`] as a flag (defined there once,
/// with its default), and what only the command line says. Flags a user gives win over the
/// config file, and the file over the defaults.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub settings: whet_train::TrainConfig,
    /// Run directory: whet.toml, metrics.jsonl, loss.svg, checkpoint/, best/, adapter/.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// TOML file with settings (names as in whet.toml).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace a previous run in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Data-parallel training over MPI even with one rank (a launch of several ranks by
    /// `mpirun` or `srun` is detected without it); needs a whet built with `--features mpi`.
    #[arg(long)]
    pub distributed: bool,
    // The `--no-` halves of the boolean settings a config file may have turned on.
    #[arg(long, hide = true, overrides_with = "use_rslora")]
    pub no_rslora: bool,
    #[arg(long, hide = true, overrides_with = "pack")]
    pub no_pack: bool,
    #[arg(long, hide = true, overrides_with = "grad_checkpoint")]
    pub no_grad_checkpoint: bool,
}

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// The teacher: any model whet loads (GGUF file, Hugging Face directory, hub id,
    /// `random:NAME`), or an OpenAI-compatible API's base URL (`http://127.0.0.1:8080/v1`:
    /// llama.cpp's llama-server, vLLM, `whet serve`, a hosted API) with --teacher-model.
    #[arg(long)]
    pub teacher: String,
    /// With an endpoint teacher: the `model` to ask for.
    #[arg(long)]
    pub teacher_model: Option<String>,
    /// With an endpoint teacher: the environment variable holding its API key (sent as
    /// `Authorization: Bearer`).
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// With an endpoint teacher: requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// With an endpoint teacher: seconds one request may take.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// With an endpoint teacher: retries of a request that got 429, a 5xx or no connection,
    /// with exponential backoff (and the server's `Retry-After`).
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
    /// Keep the teacher's dense weights block-quantized for decoding: `q8_0` or `q4_0`.
    #[arg(long, value_enum, value_name = "TYPE")]
    pub teacher_quantize: Option<whet_model::Quantization>,
    /// The unlabelled inputs: JSONL with `messages` or a text field (text, input, prompt,
    /// question, instruction; answers in the record are ignored), or a text file with one
    /// input per line.
    #[arg(long)]
    pub inputs: std::path::PathBuf,
    /// Where to write train.jsonl, valid.jsonl, test.jsonl, answers.jsonl and distill.json.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// The teacher's system prompt (the student never sees it).
    #[arg(long)]
    pub system_prompt_file: Option<std::path::PathBuf>,
    /// Worked examples shown to the teacher before each input, drawn from --shots-from
    /// (stratified by label with --labels).
    #[arg(long, default_value_t = 0, requires = "shots_from")]
    pub shots: usize,
    /// A chat dataset with answers (the format `whet data` reads) to draw --shots from.
    #[arg(long)]
    pub shots_from: Option<std::path::PathBuf>,
    /// Ask the teacher this many times per input (with --temperature above 0) and keep the
    /// majority answer; its share is the input's agreement.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Drop inputs whose majority answer has less than this share of the samples.
    #[arg(long, default_value_t = 0.0)]
    pub min_agreement: f64,
    /// The answers allowed, comma-separated: others are dropped (and counted); case, quotes
    /// and a final full stop do not matter.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// A rules.toml (as `whet eval` reads it): answers that break any rule are dropped and
    /// counted.
    #[arg(long)]
    pub rules: Option<std::path::PathBuf>,
    /// A JSON Schema file: answers must be JSON it accepts (a code fence or prose around the
    /// JSON is cut away; the kept answer is the JSON alone, compact); others are dropped and
    /// counted, and answers vote by their JSON value, not their spacing.
    #[arg(long, value_name = "FILE", conflicts_with = "labels")]
    pub json_schema: Option<std::path::PathBuf>,
    /// Label only the first N inputs.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Then train the student on the result into this run directory (as `whet train`) and
    /// compare it, fine-tuned, against itself prompted as the teacher was and against the
    /// teacher (a local one), on the held-out split: RUN/compare/.
    #[arg(long, value_name = "RUN")]
    pub train: Option<std::path::PathBuf>,
    /// The student of --train [default: whet train's default model].
    #[arg(long, requires = "train")]
    pub student: Option<String>,
    /// The student's training settings for --train (a train.toml; its `model` and `data` are
    /// the student and the distilled set) [default: whet train's defaults].
    #[arg(long, value_name = "FILE", requires = "train")]
    pub train_config: Option<std::path::PathBuf>,
    /// A small gold-labelled test set (chat examples with their answers): --train compares on
    /// it too, into RUN/compare-gold/.
    #[arg(long, value_name = "FILE", requires = "train")]
    pub gold: Option<std::path::PathBuf>,
    /// Train, validation and test shares of the kept inputs.
    #[arg(long, default_value = "0.8,0.1,0.1")]
    pub split: String,
    /// Most sequences the teacher decodes at once.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// The teacher's decoding (greedy by default; --max-tokens caps an answer).
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Replace a previous `whet distill` output at --out.
    #[arg(long)]
    pub overwrite: bool,
}
