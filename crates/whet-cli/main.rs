//! `whet`: local LoRA fine-tuning of small Llama-class models — the command-line front end.

mod adapter;
mod args;
mod batch;
mod bench;
mod chat;
mod data;
mod distill;
mod eval;
mod generate;
mod info;
mod model;
mod output;
mod pairs;
mod serve;
mod tokenize;
mod train;

use clap::{CommandFactory, FromArgMatches};
use std::io::Write;

// Training allocates and frees tensors of tens of megabytes every step; glibc's malloc returns
// such blocks to the kernel each time, and the page faults of getting them back cost ~15% of a
// CPU training step. mimalloc keeps them (see `keep_freed_memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v2's `purge_delay` option, by its index in `mi_option_t` (between
/// `eager_commit_delay` = 14 and `use_numa_nodes` = 16; the bindings do not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed memory back to the kernel. By default mimalloc does so 10 ms after a free;
/// a training step frees and reallocates gigabytes, and where transparent huge pages are on,
/// each page fault then zeroes 2 MB: measured 103 -> 135 tokens/s in `whet bench train` on a
/// 2-core machine. Peak memory is unchanged: what is kept is reused by the next step.
fn keep_freed_memory() {
    // SAFETY: mimalloc options may be set at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Put the model's weights in 2 MB pages, where the kernel gives them only on request
/// (transparent huge pages set to `madvise`, Debian's default). Decoding reads every weight once
/// a token, and with 4 KB pages it crosses a page, and a TLB entry, every 4 KB. Measured on a
/// 2-core AVX2 machine, alternated: `whet bench generate` f32 decode 24.6 -> 26.3 tokens/s
/// (medians of 6 pairs; 10 of 14 pairs faster), `scripts/membw.c` with `madvise` 17.2 -> 19.0
/// GB/s. Not for training, whose steps did not gain (one pair 185 vs 145 tokens/s, one 179 vs
/// 192). A user's own `MIMALLOC_ALLOW_LARGE_OS_PAGES` is kept.
fn weights_in_large_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_LARGE_OS_PAGES").is_none()
        && std::env::var_os("MIMALLOC_LARGE_OS_PAGES").is_none()
    {
        // SAFETY: mimalloc options may be set at any time, from any thread.
        unsafe { libmimalloc_sys::mi_option_set(libmimalloc_sys::mi_option_large_os_pages, 1) }
    }
}

/// Training on the CPU runs shards of each batch side by side, each on threads of its own (see
/// whet-train's `shards` module). candle's elementwise ops share one process-wide pool whose
/// callers queue for it and whose worker spins between ops; shards calling it at once lose
/// about a sixth of each step to it: `whet bench train` on 2 cores, 300 -> 364 tokens/s with
/// one thread per elementwise op. candle reads this setting when it first uses the pool; a
/// user's own `CANDLE_NUM_THREADS` is kept.
///
/// The shards take their threads from rayon's global pool, which is sized here as candle sizes
/// its matmuls: one thread per physical core (or `RAYON_NUM_THREADS`), not per hyperthread.
fn training_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Sound: called before this process starts any other thread.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Ranks of a distributed run on one machine share its cores.
    let ranks_here = whet_train::dist::Launch::from_env().map_or(1, |l| l.local_size.max(1));
    let threads = (candle_core::utils::get_num_threads() / ranks_here).max(1);
    // Fails only if the pool already exists, which nothing before this point creates.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
}

fn main() {
    keep_freed_memory();
    let matches = args::Cli::command().get_matches();
    let cli = args::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The settings a user typed (or set in the environment) win over a config file's.
    let given: Vec<String> = matches
        .subcommand_matches("train")
        .map(|m| {
            m.ids()
                .filter(|id| {
                    matches!(
                        m.value_source(id.as_str()),
                        Some(clap::parser::ValueSource::CommandLine)
                            | Some(clap::parser::ValueSource::EnvVariable)
                    )
                })
                .map(|id| id.as_str().to_string())
                .collect()
        })
        .unwrap_or_default();
    if matches!(
        cli.command,
        args::Command::Train(_) | args::Command::Bench(args::BenchCommand::Train(_))
    ) {
        training_threads();
    }
    if matches!(
        cli.command,
        args::Command::Generate(_)
            | args::Command::Chat(_)
            | args::Command::Serve(_)
            | args::Command::Eval(_)
            | args::Command::Compare(_)
            | args::Command::Distill(_)
            | args::Command::Bench(
                args::BenchCommand::Generate(_)
                    | args::BenchCommand::Serve(_)
                    | args::BenchCommand::Eval(_)
                    | args::BenchCommand::Distill(_)
            )
    ) {
        weights_in_large_pages();
    }
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        args::Command::Generate(a) => generate::run(a),
        args::Command::Chat(a) => chat::run(a),
        args::Command::Info(a) => info::run(a),
        args::Command::Tokenize(a) => tokenize::run(a),
        args::Command::Adapter(args::AdapterCommand::Info(a)) => adapter::info(a),
        args::Command::Merge(a) => adapter::merge(a),
        args::Command::Adapter(args::AdapterCommand::Convert(a)) => adapter::convert(a),
        args::Command::Adapter(args::AdapterCommand::Check(a)) => adapter::check(a),
        args::Command::Train(a) => train::run(a, &given),
        args::Command::Serve(a) => serve::run(a),
        args::Command::Distill(a) => distill::run(a),
        args::Command::Eval(a) => eval::eval(a),
        args::Command::Compare(a) => eval::compare(a),
        args::Command::Data(args::DataCommand::Check(a)) => data::check(a),
        args::Command::Data(args::DataCommand::Preview(a)) => data::preview(a),
        args::Command::Data(args::DataCommand::Prepare(a)) => data::prepare(a),
        args::Command::Data(args::DataCommand::Pairs(a)) => pairs::run(a),
        args::Command::Bench(args::BenchCommand::Generate(a)) => bench::generate(a),
        args::Command::Bench(args::BenchCommand::Data(a)) => data::bench(a),
        args::Command::Bench(args::BenchCommand::Train(a)) => bench::train(a),
        args::Command::Bench(args::BenchCommand::Serve(a)) => bench::serve(a),
        args::Command::Bench(args::BenchCommand::Distill(a)) => distill::bench(a),
        args::Command::Bench(args::BenchCommand::Eval(a)) => eval::bench(a),
    };
    if let Err(err) = result {
        // Output piped into `head` closes early; that is not an error worth a message.
        if is_broken_pipe(&err) {
            std::process::exit(0);
        }
        let _ = std::io::stdout().flush();
        // Data problems are many and each has its own line, file and line number.
        if let Some(errors) = err.downcast_ref::<whet_data::DataErrors>() {
            for e in &errors.errors {
                eprintln!("error: {e}");
            }
            if errors.more > 0 {
                eprintln!("error: ... and {} more", errors.more);
            }
            eprintln!("error: {} problem(s) in the data; nothing was written", errors.len());
            std::process::exit(1);
        }
        // In a distributed run, rank 0 reports what every rank met alike; the others say
        // what only they met, naming themselves.
        let rank = whet_train::dist::Launch::from_env().map_or(0, |l| l.rank);
        let on_rank = err.chain().find_map(|e| match e.downcast_ref::<whet_train::TrainError>() {
            Some(whet_train::TrainError::OnRank { rank, .. }) => Some(*rank),
            _ => None,
        });
        if on_rank.is_some_and(|r| r != 0) {
            whet_train::dist::linger_for_rank_zero();
            std::process::exit(1);
        }
        let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
        if rank != 0 && on_rank.is_none() {
            eprintln!("error: rank {rank}: {}", dedup_chain(&chain));
            std::process::exit(1);
        }
        // A message may end with its own `\nhint: ...`: that goes on a line of its own.
        let joined = dedup_chain(&chain);
        let (message, hint) = match joined.split_once(HINT_BREAK) {
            Some((m, h)) => (m.to_string(), Some(h.replace(HINT_BREAK, "; ").to_string())),
            None => (joined, model::hint_for(&err)),
        };
        eprintln!("error: {message}");
        if let Some(hint) = hint {
            eprintln!("hint: {hint}");
        }
        std::process::exit(1);
    }
}

/// Where an error's own hint starts, kept by [`dedup_chain`] (every other line break becomes a
/// space).
const HINT_BREAK: &str = "\u{1}hint: ";

/// Join an error chain on one line, dropping links that only repeat their cause; a
/// `\nhint: ` in it is kept as [`HINT_BREAK`].
fn dedup_chain(chain: &[String]) -> String {
    let mut parts: Vec<&str> = vec![];
    for (i, link) in chain.iter().enumerate() {
        if chain.get(i + 1).is_some_and(|next| link.ends_with(next.as_str())) {
            // "context: cause" already contains the next link; keep only the longer one.
            parts.push(
                link.strip_suffix(chain[i + 1].as_str())
                    .unwrap_or(link)
                    .trim_end_matches([':', ' ']),
            );
            continue;
        }
        parts.push(link);
    }
    parts.retain(|p| !p.is_empty());
    parts.join(": ").replace("\nhint: ", HINT_BREAK).replace('\n', " ")
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WHET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
