use super::*;
use candle_core::{DType, Device, Tensor, Var, D};

fn close(a: &Tensor, b: &Tensor, tol: f32) {
    let err = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let err = err.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
    assert!(err < tol, "max difference {err}");
}

/// Reference versions composed of candle's differentiable primitives.
fn rms_norm_ref(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap()
}

fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let cos =
        Tensor::cat(&[cos, cos], D::Minus1).unwrap().unsqueeze(0).unwrap().unsqueeze(0).unwrap();
    let sin =
        Tensor::cat(&[sin, sin], D::Minus1).unwrap().unsqueeze(0).unwrap().unsqueeze(0).unwrap();
    let half = x.dim(D::Minus1).unwrap() / 2;
    let x1 = x.narrow(D::Minus1, 0, half).unwrap();
    let x2 = x.narrow(D::Minus1, half, half).unwrap();
    let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
}

/// Each op's value and input gradient equal the composed reference's.
#[test]
fn ops_and_their_gradients_equal_composed_references() {
    let d = Device::Cpu;
    let x = Var::randn(0f32, 1., (2, 3, 5, 8), &d).unwrap();
    let w = Tensor::randn(1f32, 0.1, 8, &d).unwrap();
    let probe = Tensor::randn(0f32, 1., (2, 3, 5, 8), &d).unwrap(); // a random output gradient
    let check = |ours: Tensor, reference: Tensor| {
        close(&ours, &reference, 1e-5);
        let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        close(g1.get(&x).unwrap(), g2.get(&x).unwrap(), 1e-4);
    };
    check(rms_norm(x.as_tensor(), &w, 1e-5).unwrap(), rms_norm_ref(x.as_tensor(), &w, 1e-5));
    // f64 takes the composed path other devices use.
    let (x64, w64) = (
        Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap(),
        w.to_dtype(DType::F64).unwrap(),
    );
    let (ours, reference) = (rms_norm(&x64, &w64, 1e-5).unwrap(), rms_norm_ref(&x64, &w64, 1e-5));
    close(&ours, &reference, 1e-5);
    let probe64 = probe.to_dtype(DType::F64).unwrap();
    let g1 = (ours * &probe64).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (reference * &probe64).unwrap().sum_all().unwrap().backward().unwrap();
    close(g1.get(&x64).unwrap(), g2.get(&x64).unwrap(), 1e-4);
    let cos = Tensor::randn(0f32, 1., (5, 4), &d).unwrap();
    let sin = Tensor::randn(0f32, 1., (5, 4), &d).unwrap();
    let reference = rope_ref(x.as_tensor(), &cos, &sin);
    close(&rope(x.as_tensor(), &cos, &sin).unwrap(), &reference, 1e-5);
    let want = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    close(&rope_backward(&probe, &cos, &sin).unwrap(), want.get(&x).unwrap(), 1e-5);
    let m = Tensor::randn(0f32, 1., (6, 8), &d).unwrap();
    let ours = frozen_matmul(x.as_tensor(), &m).unwrap();
    let dense = x.as_tensor().broadcast_matmul(&m.t().unwrap()).unwrap();
    close(&ours, &dense, 1e-5);
    let g = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&m).is_none(), "no gradient computed for the frozen weight");
    let want = dense.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    close(g.get(&x).unwrap(), want.get(&x).unwrap(), 1e-3);
}

/// Composed attention with the keys and values copied per query head, as Hugging Face's
/// `repeat_kv` does.
fn attention_ref(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
    let rep = q.dim(1).unwrap() / k.dim(1).unwrap();
    let repeat = |x: &Tensor| {
        let (b, kv, s, d) = x.dims4().unwrap();
        Tensor::cat(&vec![x; rep], 2).unwrap().reshape((b, kv * rep, s, d)).unwrap()
    };
    let att = (q.matmul(&repeat(k).t().unwrap()).unwrap() * scale).unwrap();
    let att = att.broadcast_add(mask).unwrap();
    candle_nn::ops::softmax(&att, D::Minus1).unwrap().matmul(&repeat(v)).unwrap()
}

/// Grouped-query attention (6 query heads on 2 key/value heads) with a causal mask, plain
/// and packed (per-row mask): values and the gradients of q, k and v equal the composed
/// reference's.
#[test]
fn attention_and_its_gradients_equal_the_composed_reference() {
    let d = Device::Cpu;
    // 5 positions: one block of query rows; 70: several (`ROW_BLOCK`), each over only the
    // keys its rows see, with blocks that straddle two stacked query heads.
    for t in [5, 70] {
        let q = Var::randn(0f32, 1., (2, 6, t, 4), &d).unwrap();
        let k = Var::randn(0f32, 1., (2, 2, t, 4), &d).unwrap();
        let v = Var::randn(0f32, 1., (2, 2, t, 4), &d).unwrap();
        let probe = Tensor::randn(0f32, 1., (2, 6, t, 4), &d).unwrap();
        let causal: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0. }))
            .collect();
        let causal = Tensor::from_vec(causal, (t, t), &d).unwrap();
        // Row 1 holds two packed examples, positions 0..3t/5 and the rest.
        let cut = 3 * t / 5;
        let cut = Tensor::from_vec(
            (0..t * t)
                .map(|n| if n / t >= cut && n % t < cut { f32::NEG_INFINITY } else { 0. })
                .collect(),
            (t, t),
            &d,
        )
        .unwrap();
        let packed = Tensor::stack(&[causal.clone(), (&causal + cut).unwrap()], 0)
            .unwrap()
            .unsqueeze(1)
            .unwrap(); // [B, 1, T, S]
                       // f32 runs whet's CPU kernel; f64 the composed ops other devices use.
        for dtype in [DType::F32, DType::F64] {
            let cast = |x: &Var| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let (q, k, v) = (cast(&q), cast(&k), cast(&v));
            let probe = probe.to_dtype(dtype).unwrap();
            for mask in [&causal, &packed] {
                let mask = mask.to_dtype(dtype).unwrap();
                let ours = attention(&q, &k, &v, Some(&mask), 0.5).unwrap();
                let reference = attention_ref(&q, &k, &v, &mask, 0.5);
                close(&ours, &reference, 1e-5);
                let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                for x in [&q, &k, &v] {
                    close(g1.get(x).unwrap(), g2.get(x).unwrap(), 1e-4);
                }
            }
        }
    }
}

/// The CPU kernel (f32) and the composed fallback (f64) equal `silu(gate) * up`, values and
/// gradients.
#[test]
fn swiglu_and_its_gradients_equal_silu_times_up() {
    for dtype in [DType::F32, DType::F64] {
        let rand = |s: f32| {
            let t = Tensor::randn(0f32, s, (3, 7, 10), &Device::Cpu).unwrap();
            Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
        };
        let (g, u) = (rand(3.0), rand(1.0));
        let probe = rand(1.0);
        let ours = swiglu(&g, &u).unwrap();
        let reference = (g.silu().unwrap() * u.as_tensor()).unwrap();
        close(&ours, &reference, 1e-5);
        let g1 = (ours * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        for x in [&g, &u] {
            close(g1.get(x).unwrap(), g2.get(x).unwrap(), 1e-5);
        }
    }
}

/// The trap these ops exist for: candle's fused kernels silently cut the graph.
#[test]
fn fused_kernels_alone_cut_the_graph() {
    let x = Var::randn(0f32, 1., (2, 8), &Device::Cpu).unwrap();
    let w = Tensor::ones(8, candle_core::DType::F32, &Device::Cpu).unwrap();
    let fused = candle_nn::ops::rms_norm(x.as_tensor(), &w, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(fused.get(&x).is_none());
    let ours = rms_norm(x.as_tensor(), &w, 1e-5).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(ours.get(&x).is_some());
}

/// Both paths: the CPU f32 kernel, and the composed fallback (taken here by f64 logits)
/// that other devices use.
#[test]
fn cross_entropy_and_its_gradient_equal_the_composed_version() {
    for dtype in [DType::F32, DType::F64] {
        let x = Tensor::randn(0f32, 3., (6, 11), &Device::Cpu).unwrap();
        let logits = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &Device::Cpu).unwrap();
        let ours = cross_entropy(logits.as_tensor(), &targets).unwrap();
        let logp = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let reference = logp
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .neg()
            .unwrap()
            .mean_all()
            .unwrap();
        let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let (a, b) = (scalar(&ours), scalar(&reference));
        assert!((a - b).abs() < 1e-5, "{dtype:?}: {a} vs {b}");
        let g1 = (ours * 3.0).unwrap().backward().unwrap();
        let g2 = (reference * 3.0).unwrap().backward().unwrap();
        let (g1, g2) = (g1.get(&logits).unwrap(), g2.get(&logits).unwrap());
        assert_eq!(g1.dtype(), dtype);
        let diff = (g1 - g2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(scalar(&diff) < 1e-5, "{dtype:?}: {}", scalar(&diff));
    }
}

#[test]
fn a_target_outside_the_vocabulary_is_an_error() {
    let logits = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    let targets = Tensor::new(&[1u32, 5], &Device::Cpu).unwrap();
    let e = cross_entropy(&logits, &targets).unwrap_err().to_string();
    assert!(e.contains("target token 5 is outside the vocabulary of 5"), "{e}");
}

/// The quantized matmul — tiled kernel and composed path — equals the dense product with the
/// dequantized weight, in value and input gradient, for block-32 and block-256 types and for
/// weights of one tile and of several (the last one partial).
#[test]
fn quantized_matmul_equals_the_dequantized_product() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let d = Device::Cpu;
    for (dtype, rows, cols) in
        [(GgmlDType::Q8_0, 40, 64), (GgmlDType::Q4_0, 1100, 512), (GgmlDType::Q4K, 300, 2048)]
    {
        let w = Tensor::randn(0f32, 1., (rows, cols), &d).unwrap();
        let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
        assert!(cpu::qgemm::QWeight::new(&q).is_some(), "{dtype:?} takes the kernel");
        let wd = q.dequantize(&d).unwrap();
        let x = Var::randn(0f32, 1., (2, 9, cols), &d).unwrap();
        let probe = Tensor::randn(0f32, 1., (2, 9, rows), &d).unwrap();
        let dense = x.as_tensor().broadcast_matmul(&wd.t().unwrap()).unwrap();
        let want = (&dense * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let ours = quantized_matmul(x.as_tensor(), &q).unwrap();
        let tol = 1e-4 * (cols as f32).sqrt();
        close(&ours, &dense, tol);
        let got = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        close(got.get(&x).unwrap(), want.get(&x).unwrap(), tol);
        close(&quantized_matmul_backward(&probe, &q).unwrap(), want.get(&x).unwrap(), tol);
        let composed = composed::quantized_matmul(x.as_tensor(), &q).unwrap();
        close(&composed, &dense, tol);
        let back = composed::quantized_matmul_backward(&probe, &q).unwrap();
        close(&back, want.get(&x).unwrap(), tol);
    }
}

/// The decoding kernel equals candle's block dot products (the same Q8_0-quantized input, the
/// same integer sums: only the float summation order differs) for every row count it takes,
/// on Q8_0 and Q4_0 weights; other types are left to candle.
#[test]
fn quantized_matvec_equals_candles_block_products() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;
    if !cpu::qgemv::available() {
        eprintln!("skipped: this CPU lacks AVX2/FMA/F16C, so the kernel never runs here");
        return;
    }
    let d = Device::Cpu;
    for (dtype, rows, cols) in [(GgmlDType::Q8_0, 37, 96), (GgmlDType::Q4_0, 203, 576)] {
        let w = Tensor::randn(0f32, 1., (rows, cols), &d).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let candle = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        for m in [1usize, 2, 3, 4, 5, 9, 31] {
            let x = Tensor::randn(0f32, 1., (1, m, cols), &d).unwrap();
            let ours = quantized_matvec(&x, &q).unwrap();
            if !kernels_enabled() {
                assert!(ours.is_none(), "WHET_KERNELS=portable leaves it to candle");
                continue;
            }
            let ours = ours.expect("Q8_0/Q4_0 on an AVX2 CPU take the kernel");
            assert_eq!(ours.dims(), &[1, m, rows]);
            close(&ours, &candle.forward(&x).unwrap(), 1e-5 * (cols as f32).sqrt());
            // And near the exact product (the input's 8-bit rounding apart).
            let exact = x.broadcast_matmul(&q.dequantize(&d).unwrap().t().unwrap()).unwrap();
            close(&ours, &exact, 0.05 * (cols as f32).sqrt());
        }
    }
    let k = QTensor::quantize(&Tensor::randn(0f32, 1., (8, 256), &d).unwrap(), GgmlDType::Q4K);
    let x = Tensor::randn(0f32, 1., (1, 256), &d).unwrap();
    assert!(quantized_matvec(&x, &k.unwrap()).unwrap().is_none(), "Q4_K is left to candle");
}

/// The f32 decoding kernel equals candle's matmul, for every row count a decoding step has
/// and a width that is not a multiple of its 16-value step.
#[test]
fn dense_matvec_equals_the_matmul() {
    let d = Device::Cpu;
    for (rows, cols) in [(37usize, 100usize), (203, 576)] {
        let w = Tensor::randn(0f32, 1., (rows, cols), &d).unwrap();
        for m in [1usize, 2, 3, 4, 5, 9, 15] {
            let x = Tensor::randn(0f32, 1., (1, m, cols), &d).unwrap();
            let ours = dense_matvec(&x, &w).unwrap();
            if !(kernels_enabled() && cpu::qgemv::available()) {
                assert!(ours.is_none(), "no kernel: left to candle");
                continue;
            }
            let ours = ours.expect("f32 on an AVX2 CPU takes the kernel");
            assert_eq!(ours.dims(), &[1, m, rows]);
            close(&ours, &x.broadcast_matmul(&w.t().unwrap()).unwrap(), 1e-5 * cols as f32);
        }
    }
}

/// The many-row f32 product by blocks of the weight's rows equals candle's matmul: a weight of
/// one block, one of several with a partial last block and one narrower than a block's
/// rows, each in a pool of one thread (one gemm call) and of three (a task per block).
#[test]
fn dense_matmul_equals_the_matmul() {
    let d = Device::Cpu;
    for (rows, cols) in [(40usize, 64usize), (1000, 576), (7, 2048)] {
        let w = Tensor::randn(0f32, 1., (rows, cols), &d).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 33, cols), &d).unwrap();
        let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let ours = pool.install(|| dense_matmul(&x, &w)).unwrap();
            if !kernels_enabled() {
                assert!(ours.is_none(), "WHET_KERNELS=portable leaves it to candle");
                continue;
            }
            let ours = ours.expect("f32 on the CPU takes the kernel");
            assert_eq!(ours.dims(), &[2, 33, rows]);
            close(&ours, &want, 1e-5 * cols as f32);
        }
    }
    let bf16 = Tensor::zeros((4, 8), DType::BF16, &d).unwrap();
    let x = Tensor::zeros((3, 8), DType::BF16, &d).unwrap();
    assert!(dense_matmul(&x, &bf16).unwrap().is_none(), "bf16 is left to candle");
}

#[test]
fn quantized_embedding_equals_the_dequantized_rows() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let d = Device::Cpu;
    for (dtype, cols) in [(GgmlDType::Q8_0, 64), (GgmlDType::Q4_0, 96), (GgmlDType::Q4K, 256)] {
        let table = Tensor::randn(0f32, 1., (50, cols), &d).unwrap();
        let q = QTensor::quantize(&table, dtype).unwrap();
        let ids = Tensor::new(&[[3u32, 0, 49], [7, 7, 12]], &d).unwrap();
        let want = q.dequantize(&d).unwrap().embedding(&ids.flatten_all().unwrap()).unwrap();
        let want = want.reshape((2, 3, cols)).unwrap();
        close(&quantized_embedding(&ids, &q).unwrap(), &want, 1e-7);
        let composed = composed::quantized_embedding(&ids.flatten_all().unwrap(), &q).unwrap();
        close(&composed.reshape((2, 3, cols)).unwrap(), &want, 1e-7);
        let bad = Tensor::new(&[50u32], &d).unwrap();
        let e = quantized_embedding(&bad, &q).unwrap_err().to_string();
        if kernels_enabled() {
            assert!(e.contains("token id 50 is outside the table's 50 rows"), "{e}");
        }
    }
}

/// The fastest of `runs` timed calls of `f` (after one untimed), in microseconds: the timing
/// probes below take minima because this machine's neighbours make means noisy.
fn fastest_us(runs: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .fold(f64::INFINITY, f64::min)
}

/// Where the tiled dequantizing product overtakes candle's block dot products (prints timings;
/// run by hand: `cargo test -p whet-model --lib crossover -- --ignored --nocapture`).
#[test]
#[ignore]
fn quantized_matmul_crossover() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;
    let d = Device::Cpu;
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let w = Tensor::randn(0f32, 1., (1536, 576), &d).unwrap();
        let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let qmm = QMatMul::from_arc(q.clone()).unwrap();
        for m in [1usize, 2, 4, 8, 16, 32, 48, 64, 128] {
            let x = Tensor::randn(0f32, 1., (m, 576), &d).unwrap();
            let time = |f: &dyn Fn() -> Tensor| {
                fastest_us(30, &mut || {
                    f();
                })
            };
            let dots = time(&|| qmm.forward(&x).unwrap());
            let ours = time(&|| quantized_matvec(&x, &q).unwrap().unwrap_or_else(|| x.clone()));
            let tiled = time(&|| quantized_matmul(&x, &q).unwrap());
            let f32 = time(&|| frozen_matmul(&x, &w).unwrap());
            println!(
                "{dtype:?} rows {m:4}: candle's block dots {dots:6.0} us, whet's {ours:6.0} us, \
                 tiled {tiled:6.0} us, f32 weights {f32:6.0} us"
            );
        }
    }
}

/// The vector exponentials equal libm's to 2 ulp over the whole f32 range they meet (and
/// beyond: denormal results, overflow), with lengths that leave a tail; `-inf` gives exactly
/// 0 and NaN stays NaN. Without AVX2 they are libm's own.
#[test]
fn vector_exponentials_equal_libms() {
    let mut xs: Vec<f32> = (0..20_011).map(|i| -110.0 + i as f32 * 0.01).collect();
    xs.extend([0.0, -0.0, 1e-8, -1e-8, 88.72, 88.8, 200.0, -87.34, -103.9, -104.5]);
    xs.extend([f32::NEG_INFINITY, f32::INFINITY]);
    let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
    for shift in [0.0f32, 2.5] {
        let mut ours = xs.clone();
        let sum = cpu::vmath::exp_shifted(&mut ours, shift);
        let mut expected = 0f64;
        for (x, e) in xs.iter().zip(&ours) {
            let want = (x - shift).exp();
            expected += want as f64;
            assert!(ulps(*e, want) <= 2, "exp({x} - {shift}) = {e}, libm {want}");
        }
        assert!(sum.is_infinite() && expected.is_infinite(), "the sum includes exp(inf)");
        let finite: Vec<f32> = xs.iter().copied().filter(|x| *x < 80.0).collect();
        let ours = cpu::vmath::sum_exp_shifted(&finite, shift) as f64;
        let want: f64 = finite.iter().map(|x| (x - shift).exp() as f64).sum();
        assert!((ours - want).abs() <= 1e-6 * want, "sum {ours} vs {want}");
    }
    let mut special = [f32::NEG_INFINITY, f32::NAN, 0.0];
    cpu::vmath::exp_shifted(&mut special, 0.0);
    assert_eq!(special[0].to_bits(), 0, "exp(-inf) is +0");
    assert!(special[1].is_nan() && special[2] == 1.0, "{special:?}");
    let x: Vec<f32> = (0..1003).map(|i| -50.0 + i as f32 * 0.1).collect();
    let mut sig = vec![0f32; x.len()];
    cpu::vmath::sigmoid(&mut sig, &x);
    for (x, s) in x.iter().zip(&sig) {
        let want = 1.0 / (1.0 + (-x).exp());
        assert!(ulps(*s, want) <= 3, "sigmoid({x}) = {s}, libm {want}");
    }
}

/// The head's product fused with the loss equals the product followed by cross-entropy, in
/// value and in the gradient of the hidden states, whether the logits are formed whole, a few
/// rows at a time (a partial last block) or one row at a time, for a dense head and a
/// quantized one (against its dequantized weights); without a graph it gives the same loss; a
/// bad target is refused. Under `WHET_KERNELS=portable` both step aside.
#[test]
fn linear_cross_entropy_equals_the_head_then_the_loss() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use cpu::cross_entropy::{linear_cross_entropy_in_blocks, Head};
    let d = Device::Cpu;
    let (n, c, v) = (37, 64, 101);
    let h = Var::randn(0f32, 1., (n, c), &d).unwrap();
    let dense = Tensor::randn(0f32, 0.3, (v, c), &d).unwrap();
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 53 + 7) % v as u32).chain([0, 100]).collect();
    let targets = Tensor::new(&ids[2..], &d).unwrap(); // includes 0 and V - 1
    let reference = |w: &Tensor| {
        let logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let nll = logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().neg().unwrap();
        let loss = nll.mean_all().unwrap();
        let g = (&loss * 3.0).unwrap().backward().unwrap();
        (loss.to_scalar::<f32>().unwrap(), g.get(&h).unwrap().clone())
    };
    let check = |ours: Tensor, (want, g_ref): &(f32, Tensor), what: &str| {
        let got = ours.to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-5 * want, "{what}: {got} vs {want}");
        let g = (ours * 3.0).unwrap().backward().unwrap();
        close(g.get(&h).unwrap(), g_ref, 1e-6);
    };
    let quantized = QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap();
    let want_dense = reference(&dense);
    let want_quantized = reference(&quantized.dequantize(&d).unwrap());

    let fused = linear_cross_entropy(h.as_tensor(), &dense, &targets).unwrap();
    let fused_q = quantized_linear_cross_entropy(h.as_tensor(), &quantized, &targets).unwrap();
    let (Some(fused), Some(fused_q)) = (fused, fused_q) else {
        assert!(!kernels_enabled(), "the CPU kernel runs unless WHET_KERNELS=portable");
        return;
    };
    check(fused, &want_dense, "dense");
    check(fused_q, &want_quantized, "quantized");
    let qw = || Head::Quantized(cpu::qgemm::QWeight::new(&quantized).unwrap());
    for block_values in [usize::MAX, 5 * v, v] {
        let ours = linear_cross_entropy_in_blocks(
            h.as_tensor(),
            Head::Dense(&dense),
            &targets,
            block_values,
        );
        check(ours.unwrap(), &want_dense, &format!("dense, blocks of {block_values}"));
        let ours = linear_cross_entropy_in_blocks(h.as_tensor(), qw(), &targets, block_values);
        check(ours.unwrap(), &want_quantized, &format!("quantized, blocks of {block_values}"));
    }
    let untracked = h.as_tensor().detach();
    let loss = linear_cross_entropy(&untracked, &dense, &targets).unwrap().unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() - want_dense.0).abs() < 1e-5 * want_dense.0);
    let mut out_of_range = ids[2..].to_vec();
    out_of_range[3] = v as u32;
    let bad = Tensor::new(out_of_range, &d).unwrap();
    let e = linear_cross_entropy(h.as_tensor(), &dense, &bad).unwrap_err().to_string();
    assert!(e.contains("target token 101 is outside the vocabulary of 101"), "{e}");
}

/// Attention over views of the first positions of longer key/value buffers (what decoding's
/// cache passes, read in place) equals attention over contiguous copies, for several sequences
/// and key/value heads, one of each, and a transposed view (copied first).
#[test]
fn attention_reads_cache_views_in_place() {
    let d = Device::Cpu;
    for (b, kv, h) in [(2, 3, 6), (1, 3, 9), (2, 1, 2), (1, 1, 1)] {
        let (t, s, max, hd) = (2, 7, 12, 8);
        let q = Tensor::randn(0f32, 1., (b, h, t, hd), &d).unwrap();
        let kbuf = Tensor::randn(0f32, 1., (b, kv, max, hd), &d).unwrap();
        let vbuf = Tensor::randn(0f32, 1., (b, kv, max, hd), &d).unwrap();
        let (k, v) = (kbuf.narrow(2, 0, s).unwrap(), vbuf.narrow(2, 0, s).unwrap());
        assert!(cpu::attention::head_stride(k.layout()).is_some(), "read in place");
        let mask: Vec<f32> = (0..t * s)
            .map(|i| if i % s <= s - t + i / s { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), &d).unwrap();
        let views = attention(&q, &k, &v, Some(&mask), 0.35).unwrap();
        let copies =
            attention(&q, &k.contiguous().unwrap(), &v.contiguous().unwrap(), Some(&mask), 0.35)
                .unwrap();
        close(&views, &copies, 1e-7);
        let reference = composed::attention(
            &q,
            &k.contiguous().unwrap(),
            &v.contiguous().unwrap(),
            Some(&mask),
            0.35,
        )
        .unwrap();
        close(&views, &reference, 1e-5);
        // Keys transposed in their last two dimensions and back: not a layout the kernel
        // reads in place, so it is copied first, with the same result.
        let kt = k.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
        assert!(cpu::attention::head_stride(kt.layout()).is_none() || kt.is_contiguous());
        close(&attention(&q, &kt, &v, Some(&mask), 0.35).unwrap(), &copies, 1e-7);
    }
}

/// How fast f32 decoding's products stream SmolLM2-135M's weights (30 layers' seven
/// projections and the 49k-row head, 538 MB) one row at a time (prints GB/s; run by hand:
/// `cargo test -p whet-model --release --lib decode_stream -- --ignored --nocapture`).
#[test]
#[ignore]
fn f32_decode_stream() {
    let d = Device::Cpu;
    let (c, f) = (576usize, 1536usize);
    let mut shapes = vec![];
    for _ in 0..30 {
        shapes.extend([(c, c), (192, c), (192, c), (c, c), (f, c), (f, c), (c, f)]);
    }
    shapes.push((49152, c));
    let ws: Vec<Tensor> = shapes.iter().map(|&s| Tensor::randn(0f32, 1., s, &d).unwrap()).collect();
    let bytes: usize = ws.iter().map(|w| w.elem_count() * 4).sum();
    let xs = [c, f].map(|k| Tensor::randn(0f32, 1., (1, k), &d).unwrap());
    let token = || {
        for w in &ws {
            let x = if w.dim(1).unwrap() == c { &xs[0] } else { &xs[1] };
            dense_matvec(x, w).unwrap().unwrap();
        }
    };
    token();
    let mut times = vec![];
    for _ in 0..20 {
        let t = std::time::Instant::now();
        token();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    println!(
        "{:.0} MB a token: fastest {:.1} GB/s, median {:.1} GB/s ({:.1} ms)",
        bytes as f64 / 1e6,
        gbs(times[0]),
        gbs(times[10]),
        times[10] * 1e3
    );
}

/// The frozen forward product `x W^T` computed as gemm is called now (the weight packed by
/// every call) and as `(W x^T)^T` (the activations packed, the weight read in place, the
/// result transposed after). Prints timings; run by hand: `cargo test -p whet-model --release
/// --lib orientation -- --ignored --nocapture`.
#[test]
#[ignore]
fn frozen_product_orientation() {
    use cpu::gemm::matmul;
    let t = 256;
    for (n, k) in [(576usize, 576usize), (192, 576), (1536, 576), (576, 1536)] {
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 997) as f32 * 1e-3).collect();
        let (mut y, mut yt, mut y2) = (vec![0f32; t * n], vec![0f32; t * n], vec![0f32; t * n]);
        let time = |f: &mut dyn FnMut()| fastest_us(20, f);
        let a = time(&mut || matmul(&mut y, t, n, k, (&x, k, 1), (&w, 1, k)));
        let b = time(&mut || {
            matmul(&mut yt, n, t, k, (&w, k, 1), (&x, 1, k));
            for (j, row) in yt.chunks_exact(t).enumerate() {
                for (i, v) in row.iter().enumerate() {
                    y2[i * n + j] = *v;
                }
            }
        });
        let bt = time(&mut || matmul(&mut yt, n, t, k, (&w, k, 1), (&x, 1, k)));
        let worst = y.iter().zip(&y2).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let gf = |us: f64| 2.0 * (t * n * k) as f64 / us / 1e3;
        println!(
            "{t}x{k} @ {k}x{n}: x W^T {a:7.0} us ({:.0} GFLOP/s), (W x^T)^T {b:7.0} us \
             (product alone {bt:.0} us, {:.0} GFLOP/s); |diff| {worst:.1e}",
            gf(a),
            gf(bt)
        );
    }
}
