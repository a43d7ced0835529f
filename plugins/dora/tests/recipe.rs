//! The DoRA recipe, run by the host's interpreter, against PEFT's formulas written out by hand
//! in f64: effective weight, layer output, initialisation, gradients (PEFT's, with the weight
//! norm detached, checked by finite differences of the detached objective, and shown to differ
//! from the undetached objective's), and config errors.

use cogvx_model_core::recipe_testing as common;

use cogvx_plugin_api::AdapterOutput;
use cogvx_plugin_dora::{parse_config, recipe, Config, LoraInit};
use common::*;

const IN: usize = 6;
const OUT: usize = 4;
const R: u32 = 2;
const ALPHA: f32 = 3.0;

/// PEFT's `DoraLinearLayer`: `V = W + s B A`, `W' = m / ‖V‖_row ⊙ V`.
fn peft_weight(w: &Mat, a: &Mat, b: &Mat, m: &[f64], s: f64) -> (Mat, Vec<f64>, Mat) {
    let v = w.add(&b.matmul(a).scale(s));
    let c = v.row_norms();
    let mut wp = v.clone();
    for i in 0..v.rows {
        for j in 0..v.cols {
            wp.set(i, j, m[i] / c[i] * v.at(i, j));
        }
    }
    (v, c, wp)
}

/// PEFT's gradients of `L = Σ W' ⊙ g` for `lora_A`, `lora_B` and the magnitude, the norm
/// treated as a constant: `∂L/∂V_i = (m_i / c_i) g_i`, `∂L/∂m_i = ⟨g_i, V_i⟩ / c_i`.
fn reference_grads(w: &Mat, a: &Mat, b: &Mat, m: &[f64], s: f64, g: &Mat) -> (Mat, Mat, Vec<f64>) {
    let (v, c, _) = peft_weight(w, a, b, m, s);
    let mut dv = Mat::zeros(v.rows, v.cols);
    let mut dm = vec![0.0; v.rows];
    for i in 0..v.rows {
        let gv: f64 = (0..v.cols).map(|j| g.at(i, j) * v.at(i, j)).sum();
        dm[i] = gv / c[i];
        for j in 0..v.cols {
            dv.set(i, j, m[i] / c[i] * g.at(i, j));
        }
    }
    let db = dv.matmul(&a.t()).scale(s);
    let da = b.t().matmul(&dv).scale(s);
    (da, db, dm)
}

/// Central finite differences in f64 of `loss(a, b, m)` for every entry of `a`, `b` and `m`.
fn finite_differences(
    loss: impl Fn(&Mat, &Mat, &[f64]) -> f64,
    a: &Mat,
    b: &Mat,
    m: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let h = 1e-6;
    let fd_a = (0..a.v.len())
        .map(|k| {
            let (mut p, mut q) = (a.clone(), a.clone());
            p.v[k] += h;
            q.v[k] -= h;
            (loss(&p, b, m) - loss(&q, b, m)) / (2.0 * h)
        })
        .collect();
    let fd_b = (0..b.v.len())
        .map(|k| {
            let (mut p, mut q) = (b.clone(), b.clone());
            p.v[k] += h;
            q.v[k] -= h;
            (loss(a, &p, m) - loss(a, &q, m)) / (2.0 * h)
        })
        .collect();
    let fd_m = (0..m.len())
        .map(|k| {
            let (mut p, mut q) = (m.to_vec(), m.to_vec());
            p[k] += h;
            q[k] -= h;
            (loss(a, b, &p) - loss(a, b, &q)) / (2.0 * h)
        })
        .collect();
    (fd_a, fd_b, fd_m)
}

fn max_diff(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max)
}

fn random_state(seed: u64) -> (Mat, Mat, Mat, Vec<f64>) {
    let mut rng = Rng(seed);
    let w = rng.mat(OUT, IN);
    let a = rng.mat(R as usize, IN);
    let b = rng.mat(OUT, R as usize);
    let m: Vec<f64> = rng.vec(OUT).into_iter().map(|x| 1.0 + x.abs()).collect();
    (w, a, b, m)
}

fn adapter_with(
    config: &Config,
    w: &Mat,
    a: &Mat,
    b: &Mat,
    m: &[f64],
) -> cogvx_model_core::adapter::LinearAdapter<AD> {
    let rec = recipe(config, &request(IN as u32, OUT as u32, R, ALPHA)).unwrap();
    assert_eq!(rec.output_kind, AdapterOutput::Weight);
    assert_eq!(rec.peft_type, "LORA");
    let mut ad = build(rec, request(IN as u32, OUT as u32, R, ALPHA), w, 1);
    let mv = Mat {
        rows: 1,
        cols: m.len(),
        v: m.to_vec(),
    };
    set(
        &mut ad,
        &[
            ("lora_A.weight", a.clone()),
            ("lora_B.weight", b.clone()),
            ("lora_magnitude_vector", mv),
        ],
    );
    ad
}

#[test]
fn effective_weight_and_output_match_peft() {
    for (seed, rslora) in [(1, false), (2, false), (3, true)] {
        let config = Config {
            use_rslora: rslora,
            ..Config::default()
        };
        let s = if rslora {
            ALPHA as f64 / (R as f64).sqrt()
        } else {
            ALPHA as f64 / R as f64
        };
        let (w, a, b, m) = random_state(seed);
        let ad = adapter_with(&config, &w, &a, &b, &m);
        let (_, _, want) = peft_weight(&w, &a, &b, &m, s);
        assert_close(&evaluate(&ad, &w).v, &want.v, 1e-6, "W'");

        // The layer's output: PEFT's base + (m/‖V‖ - 1) x Wᵀ + m/‖V‖ s x (BA)ᵀ = x W'ᵀ + b.
        let mut rng = Rng(seed + 100);
        let x = rng.mat(3, IN);
        let bias = rng.vec(OUT);
        assert_close(
            &forward(&ad, &x, &w, &bias).v,
            &linear(&x, &want, &bias).v,
            1e-6,
            "y",
        );
    }
}

#[test]
fn export_names_are_pefts() {
    let rec = recipe(
        &Config::default(),
        &request(IN as u32, OUT as u32, R, ALPHA),
    )
    .unwrap();
    let ad = build(
        rec,
        request(IN as u32, OUT as u32, R, ALPHA),
        &Rng(5).mat(OUT, IN),
        1,
    );
    let got: Vec<(String, Vec<usize>)> =
        values(&ad).into_iter().map(|(k, (s, _))| (k, s)).collect();
    let want = vec![
        ("lora_A.weight".to_string(), vec![R as usize, IN]),
        ("lora_B.weight".to_string(), vec![OUT, R as usize]),
        ("lora_magnitude_vector".to_string(), vec![OUT]),
    ];
    assert_eq!(got, want);
    assert!(ad.tensors().iter().all(|(_, _, trainable)| *trainable));
}

#[test]
fn initial_effective_weight_is_the_base_weight() {
    let w = Rng(11).mat(OUT, 64);
    for (init, seed) in [(LoraInit::Kaiming, 1), (LoraInit::Gaussian, 2)] {
        let config = Config {
            init_lora_weights: init,
            ..Config::default()
        };
        let rec = recipe(&config, &request(64, OUT as u32, 4, ALPHA)).unwrap();
        let ad = build(rec, request(64, OUT as u32, 4, ALPHA), &w, seed);
        assert_close(&evaluate(&ad, &w).v, &w.v, 1e-6, "W' at init");
        let v = values(&ad);
        assert_close(
            &v["lora_magnitude_vector"].1,
            &w.row_norms(),
            1e-6,
            "magnitude = ‖W‖_row",
        );
        assert!(
            v["lora_B.weight"].1.iter().all(|x| *x == 0.0),
            "lora_B starts at zero"
        );
        let a = &v["lora_A.weight"].1;
        match init {
            // kaiming_uniform_(a=√5) over fan-in 64: bound sqrt(6 / (6 * 64)) = 1/8.
            LoraInit::Kaiming => assert_uniform_within(a, 1.0 / 8.0, "lora_A"),
            // normal_(std = 1/r) = 0.25 over 256 draws.
            LoraInit::Gaussian => {
                let std = (a.iter().map(|x| x * x).sum::<f64>() / a.len() as f64).sqrt();
                assert!((0.2..0.3).contains(&std), "lora_A std {std}, want ≈ 0.25");
            }
        }
    }
}

#[test]
fn gradients_are_pefts_with_the_norm_detached() {
    for (seed, rslora) in [(21, false), (23, true)] {
        let (w, a, b, m) = random_state(seed);
        let s = if rslora {
            ALPHA as f64 / (R as f64).sqrt()
        } else {
            ALPHA as f64 / R as f64
        };
        let config = Config {
            use_rslora: rslora,
            ..Config::default()
        };
        let g = Rng(seed + 1).mat(OUT, IN);
        let got = grads(&adapter_with(&config, &w, &a, &b, &m), &w, &g);
        let (da, db, dm) = reference_grads(&w, &a, &b, &m, s, &g);
        assert_close(&got["lora_A.weight"], &da.v, 1e-5, "dL/dA");
        assert_close(&got["lora_B.weight"], &db.v, 1e-5, "dL/dB");
        assert_close(&got["lora_magnitude_vector"], &dm, 1e-5, "dL/dm");

        // The reference itself: finite differences of the objective with the norm held at its
        // current value c (what `weight_norm.detach()` means for the backward pass).
        let (_, c, _) = peft_weight(&w, &a, &b, &m, s);
        let detached_loss = |a: &Mat, b: &Mat, m: &[f64]| {
            let v = w.add(&b.matmul(a).scale(s));
            (0..OUT)
                .map(|i| {
                    (0..IN)
                        .map(|j| m[i] / c[i] * v.at(i, j) * g.at(i, j))
                        .sum::<f64>()
                })
                .sum::<f64>()
        };
        let (fd_a, fd_b, fd_m) = finite_differences(detached_loss, &a, &b, &m);
        assert!(max_diff(&fd_a, &da.v) < 1e-6, "finite differences of A");
        assert!(max_diff(&fd_b, &db.v) < 1e-6, "finite differences of B");
        assert!(max_diff(&fd_m, &dm) < 1e-6, "finite differences of m");
    }
}

/// The detach matters: the lora_A/lora_B gradients are not those of the undetached objective
/// (which would also carry the term through the norm), the magnitude's gradient is.
#[test]
fn detaching_the_norm_changes_only_the_lora_gradients() {
    let (w, a, b, m) = random_state(31);
    let s = ALPHA as f64 / R as f64;
    let g = Rng(32).mat(OUT, IN);
    let got = grads(&adapter_with(&Config::default(), &w, &a, &b, &m), &w, &g);
    let full_loss = |a: &Mat, b: &Mat, m: &[f64]| peft_weight(&w, a, b, m, s).2.dot(&g);
    let (fd_a, fd_b, fd_m) = finite_differences(full_loss, &a, &b, &m);
    assert_close(
        &got["lora_magnitude_vector"],
        &fd_m,
        1e-5,
        "dL/dm, detached or not",
    );
    assert!(
        max_diff(&got["lora_B.weight"], &fd_b) > 1e-2,
        "dL/dB should not be the undetached objective's gradient"
    );
    assert!(
        max_diff(&got["lora_A.weight"], &fd_a) > 1e-2,
        "dL/dA should not be the undetached objective's gradient"
    );

    // At initialisation (B = 0, m = ‖W‖_row): dL/dA = 0 and dL/dB = s · G · Aᵀ (m_i = c_i).
    let zero_b = Mat::zeros(OUT, R as usize);
    let m0 = w.row_norms();
    let got0 = grads(
        &adapter_with(&Config::default(), &w, &a, &zero_b, &m0),
        &w,
        &g,
    );
    assert!(got0["lora_A.weight"].iter().all(|x| x.abs() < 1e-7));
    assert_close(
        &got0["lora_B.weight"],
        &g.matmul(&a.t()).scale(s).v,
        1e-5,
        "dL/dB at init",
    );
}

#[test]
fn bad_configs_are_refused_with_the_key_named() {
    assert_eq!(parse_config("").unwrap(), Config::default());
    assert_eq!(
        parse_config(r#"{"init_lora_weights": "gaussian", "use_rslora": true}"#).unwrap(),
        Config {
            init_lora_weights: LoraInit::Gaussian,
            use_rslora: true
        }
    );
    let cases = [
        (r#"{"use_dora": true}"#, "unknown field `use_dora`"),
        (
            r#"{"init_lora_weights": false}"#,
            "`init_lora_weights`: false is not supported",
        ),
        (
            r#"{"init_lora_weights": "pissa"}"#,
            "`init_lora_weights`: \"pissa\" is not supported",
        ),
        (
            r#"{"init_lora_weights": 1}"#,
            "`init_lora_weights`: invalid type: integer `1`, expected true or \"gaussian\"",
        ),
        (
            r#"{"use_rslora": "yes"}"#,
            "`use_rslora`: invalid type: string \"yes\", expected a boolean",
        ),
    ];
    for (json, want) in cases {
        let e = parse_config(json).unwrap_err().to_string();
        assert!(
            e.contains("dora: bad [plugin.dora] table") && e.contains(want),
            "{json}: {e}"
        );
        assert!(!e.contains(" at line "), "{e}");
    }
    let mut p = cogvx_plugin_dora::builtin();
    assert!(p
        .configure(r#"{"lora_dropout": 0.1}"#)
        .unwrap_err()
        .to_string()
        .contains("unknown field `lora_dropout`"));
    let e = p
        .adapter_recipe(&request(IN as u32, OUT as u32, 0, ALPHA))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank must be a positive integer"), "{e}");
}
