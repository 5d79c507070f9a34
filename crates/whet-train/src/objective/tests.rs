//! The preference objectives against TRL (`scripts/reference_preference.py`,
//! tests/fixtures/preference/golden.json): tokenization and collation of the pairs (and of
//! KTO's answers and mismatched answers), and for each objective the loss, TRL's logged
//! metrics and every LoRA gradient at step 0 and after three AdamW steps, on a tiny random
//! Llama and Qwen2.

use super::{Kto, Objective, Preference, PreferenceLoss, Row};
use crate::optim::{AdamW, AdamWParams};
use crate::trainer::clip_grad_norm;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;
use whet_data::{ChatTemplate, Renderer, TrainOn};
use whet_model::lora::LoraConfig;
use whet_model::{load, ModelSource, TrainPass};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `got` within 1e-4 of `want`, relative to `want` or, for values that are sums of terms
/// cancelling out, to `scale`.
fn close(what: &str, got: f64, want: f64, scale: f64) {
    let tol = 1e-4 * want.abs().max(scale).max(1e-6);
    assert!((got - want).abs() <= tol, "{what}: whet {got}, TRL {want}");
}

struct Fixture {
    golden: Value,
    source: ModelSource,
    tok: whet_model::ModelTokenizer,
    template: ChatTemplate,
}

/// The golden file and, per family, its model and tokenizer.
fn fixtures() -> (Value, Vec<(String, Fixture)>) {
    let dir = root().join("tests/fixtures/preference");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let families = golden["families"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(family, want)| {
            let source = ModelSource::HfDir(root().join("tests/fixtures/families").join(family));
            let tok = load(&source, DType::F32, &Device::Cpu, 0).unwrap().tokenizer;
            let template = ChatTemplate::new(
                tok.chat_template.as_deref().unwrap(),
                "fixture",
                tok.bos_token.as_deref(),
                tok.eos_token.as_deref(),
            )
            .unwrap();
            (family.clone(), Fixture { golden: want.clone(), source, tok, template })
        })
        .collect();
    (golden, families)
}

impl Fixture {
    /// Each record of `file` (under tests/fixtures/preference) tokenized as training does.
    fn tokenized(&self, file: &str) -> Vec<whet_data::Tokenized> {
        let path = root().join("tests/fixtures/preference").join(file);
        let (_, records) = whet_data::format::read_jsonl(&path, None).unwrap();
        let eot = self.tok.stop_ids.iter().filter_map(|&i| self.tok.tokenizer.id_to_token(i));
        let renderer =
            Renderer::new(&self.tok.tokenizer, &self.template, TrainOn::All, eot.collect());
        records.iter().map(|r| renderer.tokenize(&r.example).unwrap()).collect()
    }
}

/// `batch[key]` of the golden file.
fn golden_rows<T: serde::de::DeserializeOwned>(batch: &Value, key: &str) -> Vec<Vec<T>> {
    serde_json::from_value(batch[key].clone()).unwrap()
}

/// Train a fresh r=2 adapter (lora_A from the pattern the reference script fills, lora_B zero)
/// on `rows` with `objective` for the golden file's steps, and compare the loss, the metrics
/// and every gradient with TRL's at step 0 and at the last step.
fn check_against_trl(
    objective: &dyn Objective,
    fixture: &Fixture,
    rows: &[Row],
    case: &Value,
    golden: &Value,
    at: &str,
) {
    let cpu = Device::Cpu;
    let refs: Vec<&Row> = rows.iter().collect();
    let mut model = load(&fixture.source, DType::F32, &cpu, 0).unwrap().model;
    model.add_lora(&LoraConfig::new(2, 4.0, 0.0, "all-linear", false).unwrap(), 0).unwrap();
    let named = model.lora_vars();
    for (key, var) in &named {
        let seed = (key.bytes().map(u32::from).sum::<u32>() % 1000) as f64;
        let v: Vec<f32> = (0..var.elem_count())
            .map(|k| {
                if key.contains("lora_A") {
                    (0.05 * (0.1 * k as f64 + seed).sin()) as f32
                } else {
                    0.0
                }
            })
            .collect();
        var.set(&Tensor::from_vec(v, var.shape(), &cpu).unwrap()).unwrap();
    }
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let params = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = AdamW::new(vars.clone(), params).unwrap();
    let steps = golden["steps"].as_u64().unwrap() as usize;
    for step in 0..=steps {
        let sums = objective.batch_sums(&model, &refs, &refs, &cpu).unwrap();
        let l =
            objective.loss(&model, &refs, &refs, &sums, Some(&TrainPass::default()), &cpu).unwrap();
        let store = l.collector.unwrap().backward(&l.loss).unwrap();
        let mut grads: Vec<Tensor> = vars.iter().map(|v| store.get(v).unwrap().clone()).collect();
        if step == 0 || step == steps {
            let at = format!("{at} step {step}");
            let w = &case[format!("step{step}")];
            let got = l.loss.to_scalar::<f32>().unwrap() as f64;
            close(&format!("{at}: loss"), got, w["loss"].as_f64().unwrap(), 0.0);
            let tie = w["metrics"]["rewards/margins"].as_f64() == Some(0.0);
            for (k, v) in w["metrics"].as_object().unwrap() {
                // At step 0 both sides of every pair tie in TRL (the reference is the policy);
                // whet's reference pass runs other kernels, so its ties are within rounding
                // either way and the accuracy of ties is not compared.
                if tie && k == "rewards/accuracies" {
                    continue;
                }
                let ours = l.metrics.iter().find(|(n, _)| n == k).map(|(_, x)| *x);
                let ours = ours.unwrap_or_else(|| panic!("{at}: no metric {k}"));
                // Rewards are beta times a difference of log-probabilities of about -60, each
                // within f32 rounding: absolute 1e-5.
                close(&format!("{at}: {k}"), ours, v.as_f64().unwrap(), 0.1);
            }
            for ((key, _), g) in named.iter().zip(&grads) {
                let theirs = &w["grads"][key];
                let flat = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let abs: f64 = flat.iter().map(|x| x.abs() as f64).sum();
                let scale = theirs["abs_sum"].as_f64().unwrap();
                close(&format!("{at}: {key} abs sum"), abs, scale, 0.0);
                let sum: f64 = flat.iter().map(|&x| x as f64).sum();
                close(&format!("{at}: {key} sum"), sum, theirs["sum"].as_f64().unwrap(), scale);
                for (i, x) in theirs["first"].as_array().unwrap().iter().enumerate() {
                    close(
                        &format!("{at}: {key}[{i}]"),
                        flat[i] as f64,
                        x.as_f64().unwrap(),
                        scale / flat.len() as f64,
                    );
                }
            }
        }
        if step < steps {
            clip_grad_norm(&mut grads, golden["max_grad_norm"].as_f64().unwrap()).unwrap();
            opt.step(&grads, golden["lr"].as_f64().unwrap()).unwrap();
        }
    }
}

#[test]
fn preference_objectives_match_trl() {
    let (golden, families) = fixtures();
    for (family, fixture) in &families {
        let pairs = fixture.tokenized("pairs.jsonl");
        // The token ids and completion masks TRL's collator makes, side by side.
        let batch = &fixture.golden["batch"];
        let rejected: Vec<_> = pairs.iter().map(|p| p.rejected.as_deref().unwrap()).collect();
        let side = |ts: &[&whet_data::Tokenized]| {
            (
                ts.iter().map(|t| t.ids.clone()).collect::<Vec<_>>(),
                ts.iter().map(|t| t.mask.clone()).collect::<Vec<_>>(),
            )
        };
        let chosen: Vec<_> = pairs.iter().collect();
        assert_eq!(side(&chosen).0, golden_rows::<u32>(batch, "chosen_ids"), "{family}");
        assert_eq!(side(&chosen).1, golden_rows::<u8>(batch, "chosen_mask"), "{family}");
        assert_eq!(side(&rejected).0, golden_rows::<u32>(batch, "rejected_ids"), "{family}");
        assert_eq!(side(&rejected).1, golden_rows::<u8>(batch, "rejected_mask"), "{family}");
        let rows: Vec<Row> = pairs
            .iter()
            .zip(&rejected)
            .map(|(c, r)| Row {
                ids: c.ids.clone(),
                mask: c.mask.clone(),
                packed: None,
                rejected: Some((r.ids.clone(), r.mask.clone())),
                desirable: None,
                reference: None,
            })
            .collect();
        for (name, case) in fixture.golden["objectives"].as_object().unwrap() {
            let s = &case["settings"];
            let f = |k: &str, d: f64| s[k].as_f64().unwrap_or(d);
            let loss = match s["objective"].as_str().unwrap() {
                "dpo" => PreferenceLoss::Dpo,
                "ipo" => PreferenceLoss::Ipo,
                "simpo" => PreferenceLoss::Simpo,
                "orpo" => PreferenceLoss::Orpo,
                other => panic!("{other}"),
            };
            let objective = Preference {
                loss,
                beta: f("beta", 0.1),
                label_smoothing: f("label_smoothing", 0.0),
                gamma: f("simpo_gamma", 0.5),
                precompute_ref: false,
                rpo_alpha: f("rpo_alpha", 0.0),
            };
            check_against_trl(
                &objective,
                fixture,
                &rows,
                case,
                &golden,
                &format!("{family} {name}"),
            );
        }
    }
}

#[test]
fn kto_matches_trl() {
    let (golden, families) = fixtures();
    for (family, fixture) in &families {
        let answers = fixture.tokenized("unpaired.jsonl");
        let batch = &fixture.golden["kto_batch"];
        let ids: Vec<_> = answers.iter().map(|t| t.ids.clone()).collect();
        let masks: Vec<_> = answers.iter().map(|t| t.mask.clone()).collect();
        assert_eq!(ids, golden_rows::<u32>(batch, "ids"), "{family}");
        assert_eq!(masks, golden_rows::<u8>(batch, "mask"), "{family}");
        let labels: Vec<bool> = serde_json::from_value(batch["label"].clone()).unwrap();
        assert_eq!(answers.iter().map(|t| t.desirable.unwrap()).collect::<Vec<_>>(), labels);
        let rows: Vec<Row> = answers
            .iter()
            .map(|t| Row {
                ids: t.ids.clone(),
                mask: t.mask.clone(),
                packed: None,
                rejected: None,
                desirable: t.desirable,
                reference: None,
            })
            .collect();
        let refs: Vec<&Row> = rows.iter().collect();
        for (name, case) in fixture.golden["kto"].as_object().unwrap() {
            let s = &case["settings"];
            let f = |k: &str, d: f64| s[k].as_f64().unwrap_or(d);
            let objective = Kto {
                beta: f("beta", 0.1),
                desirable_weight: f("desirable_weight", 1.0),
                undesirable_weight: f("undesirable_weight", 1.0),
                precompute_ref: false,
                max_len: 1 << 20,
            };
            // The mismatched sequences of the KL estimate, as TRL collates them.
            let kl = objective.mismatched(&refs, &refs).unwrap();
            let kl_ids: Vec<_> = kl.iter().map(|(i, _)| i.clone()).collect();
            let kl_masks: Vec<_> = kl.iter().map(|(_, m)| m.clone()).collect();
            assert_eq!(kl_ids, golden_rows::<u32>(batch, "kl_ids"), "{family}");
            assert_eq!(kl_masks, golden_rows::<u8>(batch, "kl_mask"), "{family}");
            check_against_trl(
                &objective,
                fixture,
                &rows,
                case,
                &golden,
                &format!("{family} {name}"),
            );
        }
    }
}
