//! The commands working: generate, chat, info, bench.

use crate::*;

#[test]
fn generate_chat_answers_paris() {
    if !have_default_model() {
        return;
    }
    let o = whet(&["generate", "--chat", "--prompt", "What is the capital of France?"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "{}", stdout(&o));
}

#[test]
fn chat_keeps_history_and_resets() {
    if !have_default_model() {
        return;
    }
    let (q1, q2) = ("What is the capital of France?", "Tell me more about it.");
    let input = format!("{q1}\n{q2}\n/reset\n{q2}\n/quit\nnever read\n");
    let o = whet(&["chat", "--max-tokens", "24"], &input);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let replies: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(replies.len(), 3, "{out}");
    assert!(replies[0].contains("Paris"), "{out}");
    // The same question reads differently with the Paris turn in the history than without it.
    assert_ne!(replies[1], replies[2], "history must reach the model: {out}");
    // After /reset the conversation starts afresh: the same as a one-shot chat prompt.
    let one_shot = whet(&["generate", "--chat", "--max-tokens", "24", "--prompt", q2], "");
    assert_eq!(stdout(&one_shot).trim(), replies[2].trim());
}

#[test]
fn generate_reads_the_prompt_from_stdin_and_honours_stop_strings() {
    let o = whet(&["generate", "--model", "random:tiny", "--max-tokens", "30"], "some prompt");
    assert!(o.status.success(), "{}", stderr(&o));
    let full = stdout(&o);
    let o2 = whet(
        &["generate", "--model", "random:tiny", "--max-tokens", "30", "--prompt", "some prompt"],
        "",
    );
    assert_eq!(stdout(&o2), full, "stdin and --prompt give the same text");
}

#[test]
fn info_describes_a_model() {
    let o = whet(&["info", "random:tiny"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    insta::assert_snapshot!(stdout(&o));
}

#[test]
fn info_reads_a_hub_id_from_an_offline_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--whet-test--tiny");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let src = tiny_hf_dir(None);
    std::fs::create_dir_all(&snap).unwrap();
    for f in std::fs::read_dir(src.path()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snap.join(f.file_name())).unwrap();
    }
    let env = [("HF_HOME", home.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")];
    let o = whet_in(&root(), &["info", "whet-test/tiny"], "", &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("model:          {} (safetensors", snap.display())),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("parameters:     115008"), "{}", stdout(&o));
}

#[test]
fn bench_generate_reports_speed_and_load() {
    let o = whet(
        &[
            "bench",
            "generate",
            "--model",
            "random:tiny",
            "--runs",
            "2",
            "--tokens",
            "8",
            "--prompt-tokens",
            "16",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for key in ["prefill:", "decode:", "tokens/s (median", "load avg:"] {
        assert!(out.contains(key), "{out}");
    }
    // random:tiny: 2 blocks of q, o 64x64, k, v 32x64, gate, up, down 128x64, and the untied
    // head 320x64: 94,208 weights, 376,832 bytes in f32; in Q8_0, 34 bytes per 32 weights.
    assert!(out.contains("weights:    0.38 MB read per decoded token"), "{out}");
    let quantized = whet(
        &[
            "bench",
            "generate",
            "--model",
            "random:tiny",
            "--runs",
            "1",
            "--tokens",
            "4",
            "--quantize",
            "q8_0",
        ],
        "",
    );
    assert!(quantized.status.success(), "{}", stderr(&quantized));
    assert!(stdout(&quantized).contains("weights:    0.10 MB read"), "{}", stdout(&quantized));
}

#[test]
fn bench_serve_reports_throughput_latency_and_load() {
    let args = ["bench", "serve", "--model", "random:tiny", "--streams", "3", "--requests", "4"];
    let o = whet(&[&args[..], &["--tokens", "6"]].concat(), "");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for key in
        ["1 stream:", "3 streams:", "x one stream", "4 requests:", "requests/s", "p95", "load avg:"]
    {
        assert!(out.contains(key), "{out}");
    }
}

#[test]
fn bench_eval_reports_examples_per_second() {
    let base = root().join("tests/fixtures/families/llama3");
    let o = whet(
        &[
            "bench",
            "eval",
            "--model",
            base.to_str().unwrap(),
            "--data",
            "data/intents",
            "--repeat",
            "2",
            "--max-tokens",
            "3",
        ],
        "",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for key in ["examples:   96 (48 x 2)", "examples/s", "load avg:"] {
        assert!(out.contains(key), "{out}");
    }
}

/// Regression: `println!` panicked when stdout was a closed pipe (`whet info | head -1`).
#[test]
fn closed_stdout_pipe_exits_quietly() {
    let exe = env!("CARGO_BIN_EXE_whet");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("'{exe}' info random:tiny | head -c 1 >/dev/null; '{exe}' generate --model random:tiny --prompt hi --max-tokens 300 | head -c 1 >/dev/null"))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(stderr(&o), "", "no panic, no error message");
}

/// Regression: a template read from `chat_template.jinja` (transformers' current layout) was
/// labelled as coming from `tokenizer.json`. It now names its file, and wins over
/// `tokenizer_config.json`'s `chat_template` as in transformers.
#[test]
fn info_names_the_file_the_template_came_from() {
    let dir = tiny_hf_dir(Some("{{ 'from the config' }}"));
    let p = dir.path().to_str().unwrap();
    let o = whet(&["info", p], "");
    let config = dir.path().join("tokenizer_config.json");
    assert!(
        stdout(&o).contains(&format!("chat template:  from {} (", config.display())),
        "{}",
        stdout(&o)
    );
    let jinja = dir.path().join("chat_template.jinja");
    std::fs::write(&jinja, "{% for m in messages %}{{ m['content'] }}{% endfor %}").unwrap();
    let o = whet(&["info", p], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("chat template:  from {} (53 bytes)", jinja.display())),
        "{}",
        stdout(&o)
    );
    let o = whet(
        &[
            "generate",
            "--model",
            p,
            "--chat",
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
            "--template-var",
            "oops",
        ],
        "",
    );
    assert_eq!(assert_one_line_error(&o), "error: --template-var `oops`: expected NAME=VALUE");
}

/// `whet info` names the family of each fixture (tests/fixtures/families, written by
/// scripts/reference_families.py and converted by scripts/convert_fixtures_gguf.py).
#[test]
fn info_names_each_family() {
    let dir = root().join("tests/fixtures/families");
    for (fixture, arch, extra) in [
        ("llama2", "llama", "rope:           theta 10000 None"),
        ("llama3", "llama", "rope:           theta 500000 Llama3"),
        ("llama3.gguf", "llama", "rope:           theta 500000 Factors"),
        ("mistral", "mistral", "sliding window: 4 tokens"),
        ("qwen2", "qwen2", "tied head:      true"),
        ("qwen3", "qwen3", "q/k norm:       yes"),
        ("qwen3.gguf", "qwen3", "q/k norm:       yes"),
    ] {
        let o = whet(&["info", dir.join(fixture).to_str().unwrap()], "");
        assert!(o.status.success(), "{fixture}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains(&format!("architecture:   {arch}\n")), "{fixture}: {out}");
        assert!(out.contains(extra), "{fixture}: {extra} in {out}");
    }
}

/// `whet tokenize` shows ids and texts, and works on a vocabulary-only GGUF (no weights, no
/// model configuration): llama.cpp's Llama 3 vocabulary splits numbers in runs of three.
#[test]
fn tokenize_shows_what_the_model_sees() {
    let o = whet(&["tokenize", "--model", "random:tiny", "--ids", "hi"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "74 75\n");
    let o = whet(&["tokenize", "--model", "random:tiny"], "a\n");
    assert_eq!(stdout(&o), "     67  \"a\"  a\n    201  \"\\n\"  Ċ\n");
    assert!(stderr(&o).contains("2 tokens"), "{}", stderr(&o));
    let vocab = root().join("models/llama.cpp/models/ggml-vocab-llama-bpe.gguf");
    if !vocab.exists() {
        assert!(
            !std::env::var("WHET_REQUIRE_MODEL").is_ok_and(|v| v == "1"),
            "run scripts/fetch-llama-cpp.sh"
        );
        eprintln!("SKIPPED: llama.cpp's vocabularies not fetched (scripts/fetch-llama-cpp.sh)");
        return;
    }
    let o = whet(&["tokenize", "--model", vocab.to_str().unwrap(), "--ids", "12345"], "");
    assert!(o.status.success(), "{}", stderr(&o));
    // "123" "45", as Hugging Face's Llama 3 tokenizer splits it.
    assert_eq!(stdout(&o), "4513 1774\n");
    let o = whet(&["tokenize", "--model", "nope.gguf", "x"], "");
    assert_eq!(
        assert_one_line_error(&o),
        "error: cannot load the tokenizer of `nope.gguf`: nope.gguf: file not found"
    );
}

/// `whet adapter info` on an adapter PEFT wrote with rank and alpha patterns.
#[test]
fn adapter_info_describes_a_peft_adapter() {
    let dir = root().join("tests/fixtures/adapters/patterns");
    let o = whet(&["adapter", "info", dir.to_str().unwrap()], "");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "rank, alpha:    r 4, alpha 8 (alpha/sqrt(r), rsLoRA)\n",
        "  down_proj     2 layers, rank 2/4\n",
        "  v_proj        2 layers, rank 6\n",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
    let o = whet(
        &["adapter", "info", root().join("tests/fixtures/adapters/dora").to_str().unwrap()],
        "",
    );
    assert!(assert_one_line_error(&o).contains("`use_dora` = `true`"));
}

/// `whet merge` folds a PEFT adapter (rank/alpha patterns, rsLoRA) into the tiny Llama and
/// writes a Hugging Face directory: whet loads it back with PEFT's logits, and transformers
/// loads it too (checked where transformers and torch are installed).
#[test]
fn merge_writes_a_model_that_computes_what_peft_computes() {
    use candle_core::{DType, Device};
    let base = root().join("tests/fixtures/families/llama3");
    let adapter = root().join("tests/fixtures/adapters/patterns");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let args = [
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let o = whet(&args, "");
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let (ids, want) = patterns_golden();
    let m =
        whet_model::load(&whet_model::ModelSource::HfDir(out.clone()), DType::F32, &Device::Cpu, 0)
            .unwrap();
    let got = last_logits(&m.model, &ids);
    let d = got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    assert!(d < 1e-4, "merged logits differ from PEFT's by {d}");
    // An existing --out is kept without --overwrite; a format whet does not write is refused.
    let err = assert_one_line_error(&whet(&args, ""));
    assert!(err.contains("already exists"), "{err}");
    let mut gguf = args.to_vec();
    gguf.extend(["--format", "gguf", "--overwrite"]);
    let o = whet(&gguf, "");
    assert!(stderr(&o).contains("is not a GGUF file"), "{}", stderr(&o));
    // transformers reads the directory and computes the same logits.
    let script = format!(
        "import sys, torch, transformers\nm = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).float().eval()\nprint(' '.join(str(v) for v in m(torch.tensor([{ids:?}])).logits[0, 11].tolist()))"
    );
    let py = std::process::Command::new(python()).arg("-c").arg(&script).arg(&out).output();
    match py {
        Ok(p) if p.status.success() => {
            let theirs: Vec<f64> = String::from_utf8_lossy(&p.stdout)
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            let d = theirs.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(d < 1e-4, "transformers on the merged directory differs from PEFT by {d}");
        }
        Ok(p) => eprintln!(
            "SKIPPED: transformers check of the merged model: {}",
            String::from_utf8_lossy(&p.stderr).lines().last().unwrap_or("")
        ),
        Err(e) => {
            eprintln!("SKIPPED: transformers check of the merged model: no {} ({e})", python())
        }
    }
}

/// `whet adapter convert --to gguf` writes a llama.cpp adapter for the given base; other
/// formats and adapters whet cannot read are refused.
#[test]
fn adapter_convert_writes_a_llama_cpp_adapter() {
    let base = root().join("tests/fixtures/families/llama3");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.gguf");
    let args = |adapter: &str, to: &str| {
        whet(
            &[
                "adapter",
                "convert",
                root().join("tests/fixtures/adapters").join(adapter).to_str().unwrap(),
                "--to",
                to,
                "--out",
                out.to_str().unwrap(),
                "--model",
                base.to_str().unwrap(),
            ],
            "",
        )
    };
    let o = args("patterns", "gguf");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(14 adapted modules, llama base)"), "{}", stdout(&o));
    assert!(out.exists());
    assert!(
        assert_one_line_error(&args("patterns", "onnx")).contains("`--to onnx` is not implemented")
    );
    assert!(assert_one_line_error(&args("dora", "gguf")).contains("`use_dora` = `true`"));
}

/// `whet merge --format gguf` from a GGUF base (llama.cpp's conversion of the tiny Llama 3, with
/// its `rope_freqs.weight`): the file keeps the base's metadata, loads back in whet with PEFT's
/// logits (f32), and close to them in Q8_0.
#[test]
fn merge_to_gguf_keeps_the_base_metadata_and_computes_peft_logits() {
    use candle_core::{DType, Device};
    let base = root().join("tests/fixtures/families/llama3.gguf");
    let adapter = root().join("tests/fixtures/adapters/patterns");
    let (ids, want) = patterns_golden();
    let dir = tempfile::tempdir().unwrap();
    for (quant, tol) in [("f32", 1e-4), ("q8_0", 0.05)] {
        let out = dir.path().join(format!("merged-{quant}.gguf"));
        let o = whet(
            &[
                "merge",
                "--model",
                base.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--format",
                "gguf",
                "--quant",
                quant,
            ],
            "",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let m = whet_model::load(
            &whet_model::ModelSource::Gguf(out.clone()),
            DType::F32,
            &Device::Cpu,
            0,
        )
        .unwrap();
        assert_eq!(m.tokenizer.vocab_size(), 320, "tokenizer metadata kept");
        assert!(matches!(m.config.rope_scaling, whet_model::config::RopeScaling::Factors(_)));
        let got = last_logits(&m.model, &ids);
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let d = got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(d < tol * scale.max(1.0), "{quant}: merged GGUF logits differ from PEFT's by {d}");
    }
}

/// `whet adapter check --for`: what vLLM and llama.cpp refuse or silently compute differently
/// (rules read from vLLM's PEFTHelper and llama.cpp's convert_lora_to_gguf.py); exit 1 then.
#[test]
fn adapter_check_names_what_each_runtime_would_do() {
    let check = |adapter: &str, runtime: &str| {
        let dir = root().join("tests/fixtures/adapters").join(adapter);
        whet(&["adapter", "check", dir.to_str().unwrap(), "--for", runtime], "")
    };
    let o = check("regex", "vllm");
    assert!(
        o.status.success() && stdout(&o).contains("vllm runs it as PEFT does"),
        "{}",
        stdout(&o)
    );
    let o = check("patterns", "vllm");
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("miscomputes: `alpha_pattern` is ignored"), "{}", stdout(&o));
    let o = check("patterns", "llama.cpp");
    assert!(stdout(&o).contains("rsLoRA's `alpha / sqrt(r)` is lost"), "{}", stdout(&o));
    let o = check("dora", "llama.cpp");
    assert!(stdout(&o).contains("rejects:     DoRA"), "{}", stdout(&o));
    assert!(check("dora", "peft").status.success(), "PEFT runs DoRA");
    assert!(stdout(&check("dora", "whet")).contains("`use_dora` = `true`"));
    let o = check("regex", "mistralrs");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("rejects:     `target_modules` as a regular expression"),
        "{}",
        stdout(&o)
    );
    let o = check("patterns", "mistralrs");
    assert!(stdout(&o).contains("rejects:     `rank_pattern`"), "{}", stdout(&o));
    assert!(stdout(&o).contains("miscomputes: rsLoRA's"), "{}", stdout(&o));
    let o = check("dora", "mistralrs");
    assert!(
        stdout(&o).contains("miscomputes: DoRA's magnitude vectors are ignored"),
        "{}",
        stdout(&o)
    );
    let o = check("layers", "mistralrs");
    assert!(stdout(&o).contains("rejects:     `layers_to_transform`"), "{}", stdout(&o));
    // An unknown runtime is refused by clap with the ones whet knows.
    let o = check("regex", "tgi");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("[possible values: whet, peft, vllm, llama.cpp, mistralrs]"));
}

/// Several adapters at once (`--adapter NAME=DIR[:WEIGHT]`, unmerged): one at weight 0 leaves
/// the other's text, which equals the merged single adapter's; `whet chat` switches with
/// `/adapter NAME|none|all` and `/adapter none` gives the base model's reply.
#[test]
fn several_adapters_and_chat_switching() {
    let base = root().join("tests/fixtures/families/llama3");
    let a = root().join("tests/fixtures/adapters");
    let (b, regex, layers) = (
        base.to_str().unwrap().to_string(),
        a.join("regex").to_str().unwrap().to_string(),
        a.join("layers").to_str().unwrap().to_string(),
    );
    let gen = |adapters: &[String]| {
        let mut args = vec!["generate", "--model", &b, "--prompt", "ab", "--max-tokens", "8"];
        for x in adapters {
            args.extend(["--adapter", x.as_str()]);
        }
        let o = whet(&args, "");
        assert!(o.status.success(), "{}", stderr(&o));
        o.stdout
    };
    let merged = gen(&[regex.clone()]);
    assert_eq!(gen(&[format!("r={regex}"), format!("l={layers}:0")]), merged);
    assert_ne!(gen(&[format!("r={regex}"), format!("l={layers}")]), merged, "`l` changes the text");
    let chat = |adapters: &[String], input: &str| {
        let mut args = vec!["chat", "--model", &b, "--max-tokens", "8"];
        for x in adapters {
            args.extend(["--adapter", x.as_str()]);
        }
        let o = whet(&args, input);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let base_reply = chat(&[], "q1\n");
    let adapted = chat(&[format!("r={regex}")], "q1\n");
    assert_ne!(base_reply, adapted, "the adapter changes the reply");
    assert_eq!(chat(&[format!("r={regex}")], "/adapter none\nq1\n"), base_reply);
    assert_eq!(chat(&[format!("r={regex}")], "/adapter none\n/adapter r\nq1\n"), adapted);
    let o = whet(
        &["generate", "--model", &b, "--prompt", "x", "--adapter", &format!("r={regex}:lots")],
        "",
    );
    assert!(assert_one_line_error(&o).contains("weight `lots` is not a number"));
}

/// Logits at position 11 (the golden fixtures' last position) for `ids`.
fn last_logits(model: &whet_model::Llama, ids: &[u32]) -> Vec<f32> {
    use candle_core::{Device, Tensor};
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
    logits.get(11).unwrap().to_vec1::<f32>().unwrap()
}

/// The adapter goldens' ids, and PEFT's logits at position 11 with the `patterns` adapter
/// (`scripts/reference_adapters.py`).
fn patterns_golden() -> (Vec<u32>, Vec<f64>) {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/adapters/golden.json")).unwrap(),
    )
    .unwrap();
    let ids = serde_json::from_value(golden["ids"].clone()).unwrap();
    let want =
        serde_json::from_value(golden["adapters"]["patterns"]["logits"]["11"].clone()).unwrap();
    (ids, want)
}

/// A different `base_model_name_or_path` is a warning naming both; the same model elsewhere
/// (a moved checkout: the fixture adapters name an absolute path) is not.
#[test]
fn another_base_is_a_warning_and_a_moved_one_is_not() {
    let adapter = root().join("tests/fixtures/adapters/regex");
    let run = |base: &str| {
        let model = root().join("tests/fixtures/families").join(base);
        let o = whet(
            &[
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--prompt",
                "a",
                "--max-tokens",
                "2",
            ],
            "",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    let other = run("qwen2");
    assert!(
        other.contains("was trained on") && other.contains("llama3") && other.contains("qwen2"),
        "{other}"
    );
    assert!(!run("llama3").contains("was trained on"));
}

/// `whet bench train --data --pack` trains on a dataset's packed rows and `--save-rows` writes
/// exactly the micro-batches it ran: one line per step, rows no longer than --seq-len, several
/// examples a row, each counting its positions from 0. Without --pack each row is one example.
#[test]
fn bench_train_on_a_dataset_saves_the_batches_it_ran() {
    let dir = tempfile::tempdir().unwrap();
    for pack in [true, false] {
        let rows = dir.path().join(format!("rows-{pack}.jsonl"));
        let mut args = vec!["bench", "train", "--model", "random:tiny", "--steps", "2"];
        args.extend(["--batch-size", "2", "--seq-len", "1024", "--data", "data/support-style"]);
        args.extend(["--save-rows", rows.to_str().unwrap()]);
        if pack {
            args.push("--pack");
        }
        let o = whet(&args, "");
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let packed = if pack { " (packed)" } else { "" };
        assert!(out.contains(&format!("data:       data/support-style{packed}, ")), "{out}");
        assert!(out.contains("% of them trained") && out.contains("train: "), "{out}");
        let text = std::fs::read_to_string(&rows).unwrap();
        let batches: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(batches.len(), 3, "a warm-up step and 2 measured: {text:.200}");
        let mut examples_per_row = vec![];
        for batch in &batches {
            let batch = batch["rows"].as_array().unwrap();
            assert!(!batch.is_empty() && batch.len() <= 2);
            for row in batch {
                let field = |k: &str| -> Vec<u64> {
                    row[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
                };
                let (ids, mask, pos) = (field("ids"), field("mask"), field("positions"));
                assert!(!ids.is_empty() && ids.len() <= 1024);
                assert!(ids.len() == mask.len() && ids.len() == pos.len());
                assert_eq!(pos[0], 0);
                for w in pos.windows(2) {
                    assert!(w[1] == w[0] + 1 || w[1] == 0, "positions {w:?}");
                }
                assert!(mask.iter().any(|&m| m == 1) && mask.iter().any(|&m| m == 0));
                examples_per_row.push(pos.iter().filter(|&&p| p == 0).count());
            }
        }
        if pack {
            assert!(examples_per_row.iter().all(|&n| n >= 2), "{examples_per_row:?}");
        } else {
            assert!(examples_per_row.iter().all(|&n| n == 1), "{examples_per_row:?}");
        }
    }
    let o = whet(&["bench", "train", "--model", "random:tiny", "--steps", "1", "--pack"], "");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--pack needs --data"), "{}", stderr(&o));
    let o = whet(&["bench", "train", "--model", "random:tiny", "--data", "data/nowhere"], "");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("data/nowhere"), "{}", stderr(&o));
}

/// `whet bench train --objective` runs a preference objective on random pairs (a prompt shared
/// by two answers) and says so; a pair objective without a prompt is refused.
#[test]
fn bench_train_runs_preference_objectives_on_random_pairs() {
    let quick = ["bench", "train", "--model", "random:tiny", "--steps", "1", "--seq-len", "16"];
    for (objective, extra) in
        [("dpo", vec![]), ("dpo", vec!["--precompute-ref"]), ("kto", vec![]), ("orpo", vec![])]
    {
        let mut a = quick.to_vec();
        a.extend(["--objective", objective, "--prompt-tokens", "8", "--batch-size", "2"]);
        a.extend(extra.iter().copied());
        let o = whet(&a, "");
        assert!(o.status.success(), "{objective}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains(&format!("objective:  {objective}")), "{out}");
        assert!(
            out.contains("the first 8 tokens of each are prompt") && out.contains("tokens/s"),
            "{out}"
        );
    }
    let mut a = quick.to_vec();
    a.extend(["--objective", "dpo"]);
    let e = assert_one_line_error(&whet(&a, ""));
    assert!(e.contains("--prompt-tokens 0"), "{e}");
    let mut a = quick.to_vec();
    a.extend(["--objective", "sft", "--precompute-ref"]);
    let e = assert_one_line_error(&whet(&a, ""));
    assert!(e.contains("precompute_ref"), "{e}");
}

/// The PyTorch side of the training benchmark runs whet's saved micro-batches as whet does:
/// in a packed row each example sees only itself (its logits equal the example's own run) and
/// the labels are exactly the tokens whet trains. Needs Python with torch and transformers
/// (`WHET_PYTHON`); without them it says so and checks nothing.
#[test]
fn the_pytorch_benchmark_trains_whets_packed_rows_as_whet_does() {
    let Some(python) = python_with("torch, transformers, peft") else { return };
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("rows.jsonl");
    let args = ["bench", "train", "--model", "random:tiny", "--steps", "1", "--batch-size", "2"];
    let more = ["--seq-len", "1024", "--data", "data/support-style", "--pack", "--save-rows"];
    let o = whet(&[&args[..], &more[..], &[rows.to_str().unwrap()]].concat(), "");
    assert!(o.status.success(), "{}", stderr(&o));
    let check = r#"
import json, sys, torch
sys.path.insert(0, "scripts")
from bench_train_torch import batch_inputs
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
model = LlamaForCausalLM(cfg).float().eval()
rows = json.loads(open(sys.argv[1]).readline())["rows"]
inputs, tokens = batch_inputs(rows)
assert tokens == sum(len(r["ids"]) for r in rows), tokens
trained = sum(sum(r["mask"]) for r in rows)
assert int((inputs["labels"] != -100).sum()) == trained, "labels are whet's trained tokens"
with torch.no_grad():
    packed = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    worst, examples = 0.0, 0
    for i, r in enumerate(rows):
        starts = [k for k, p in enumerate(r["positions"]) if p == 0] + [len(r["ids"])]
        for a, b in zip(starts, starts[1:]):
            alone = model(input_ids=torch.tensor([r["ids"][a:b]])).logits[0]
            worst = max(worst, (packed[i, a:b] - alone).abs().max().item())
            examples += 1
assert examples > len(rows), "rows hold several examples"
assert worst < 1e-4, worst
print(f"ok: {examples} examples, worst difference {worst:.2e}")
"#;
    let o = std::process::Command::new(&python)
        .current_dir(root())
        .args(["-c", check, rows.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("ok: "), "{}", stdout(&o));
}

/// `scripts/bench_compare.py` refuses, before running anything, a comparison it would not make
/// as asked: `--isa avx2` holds PyTorch to AVX2 but cannot hold llama.cpp's kernels.
#[test]
fn bench_compare_refuses_avx2_kernels_beside_llama_cpp() {
    let run = |args: &[&str]| {
        std::process::Command::new(python())
            .arg(root().join("scripts/bench_compare.py"))
            .args(args)
            .output()
            .unwrap()
    };
    let err = assert_one_line_error(&run(&["generate", "--isa", "avx2", "--peer", "llama.cpp"]));
    assert!(err.contains("--isa avx2") && err.contains("llama.cpp"), "{err}");
    let o = run(&["train", "--isa", "sse4"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid choice: 'sse4'"), "{}", stderr(&o));
    // The GPU comparison: train's alone, never beside CPU kernel switches, and refused up
    // front where nvidia-smi (its memory measure) is missing.
    let err = assert_one_line_error(&run(&["generate", "--device", "cuda"]));
    assert!(err.contains("--device and --dtype are train's"), "{err}");
    let err = assert_one_line_error(&run(&["train", "--device", "cuda", "--isa", "avx2"]));
    assert!(err.contains("--isa avx2") && err.contains("--device cuda"), "{err}");
    // An absolute Python: the command's PATH (searched for the program too) holds nothing.
    let exe = std::process::Command::new(python())
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let empty = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(stdout(&exe).trim())
        .arg(root().join("scripts/bench_compare.py"))
        .args(["train", "--device", "cuda", "--whet", env!("CARGO_BIN_EXE_whet")])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let err = assert_one_line_error(&o);
    assert!(err.contains("nvidia-smi") && err.contains("failed"), "{err}");
}

/// `scripts/bench_compare.py --device cuda` reports each run's peak GPU memory as the most
/// nvidia-smi showed in use while the run lasted, above what was in use when it began: here a
/// stand-in nvidia-smi whose figure grows 1000 MB at each call, beside a 0.5 s run.
#[test]
fn bench_compare_samples_gpu_memory_over_a_run() {
    let bin = tempfile::tempdir().unwrap();
    let (smi, count) = (bin.path().join("nvidia-smi"), bin.path().join("count"));
    std::fs::write(&count, "100").unwrap();
    let script = format!(
        "#!/bin/sh\nn=$(cat {c})\necho $((n + 1000)) > {c}\necho $n\n",
        c = count.display()
    );
    std::fs::write(&smi, script).unwrap();
    std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let check = r#"
import os, re, sys
sys.path.insert(0, "scripts")
import bench_compare
out = bench_compare.run(["sleep", "0.5"], gpu=True)
peak = float(re.search(r"^peak GPU MB: (\d+)$", out, re.M).group(1))
calls = (int(open(sys.argv[1]).read()) - 100) // 1000
# The first call is the baseline, the last sample the peak: every later call adds 1000 MB.
assert peak == 1000 * (calls - 1) and calls >= 3, (peak, calls)
print(f"ok: {peak:.0f} MB over {calls} calls")
"#;
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap_or_default());
    let o = std::process::Command::new(python())
        .current_dir(root())
        .args(["-c", check, count.to_str().unwrap()])
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("ok: "), "{}", stdout(&o));
}
