//! The LoHa recipe, run by the host's interpreter, against PEFT's formulas written out by hand
//! in f64: weight delta, layer output, gradients (PEFT's `HadaWeight.backward`), the
//! initialisation, export names and config errors.

use cogvx_model_core::recipe_testing as common;

use cogvx_plugin_api::AdapterOutput;
use cogvx_plugin_loha::{parse_config, recipe, Config};
use common::*;

const IN: usize = 10;
const OUT: usize = 6;

struct Factors {
    w1a: Mat,
    w1b: Mat,
    w2a: Mat,
    w2b: Mat,
}

fn random_factors(seed: u64, r: usize) -> Factors {
    let mut rng = Rng(seed);
    Factors {
        w1a: rng.mat(OUT, r),
        w1b: rng.mat(r, IN),
        w2a: rng.mat(OUT, r),
        w2b: rng.mat(r, IN),
    }
}

/// PEFT's `HadaWeight.forward`: `((w1a @ w1b) * (w2a @ w2b)) * scale`.
fn peft_delta(f: &Factors, scale: f64) -> Mat {
    f.w1a
        .matmul(&f.w1b)
        .hadamard(&f.w2a.matmul(&f.w2b))
        .scale(scale)
}

/// PEFT's `HadaWeight.backward` for `grad_out`.
fn peft_backward(f: &Factors, scale: f64, grad_out: &Mat) -> [Mat; 4] {
    let grad_out = grad_out.scale(scale);
    let temp = grad_out.hadamard(&f.w2a.matmul(&f.w2b));
    let (g1a, g1b) = (temp.matmul(&f.w1b.t()), f.w1a.t().matmul(&temp));
    let temp = grad_out.hadamard(&f.w1a.matmul(&f.w1b));
    let (g2a, g2b) = (temp.matmul(&f.w2b.t()), f.w2a.t().matmul(&temp));
    [g1a, g1b, g2a, g2b]
}

fn adapter_with(
    f: &Factors,
    w: &Mat,
    r: u32,
    alpha: f32,
) -> cogvx_model_core::adapter::LinearAdapter<AD> {
    let req = request(IN as u32, OUT as u32, r, alpha);
    let rec = recipe(&Config::default(), &req).unwrap();
    assert_eq!(
        (rec.output_kind, rec.peft_type.as_str()),
        (AdapterOutput::WeightDelta, "LOHA")
    );
    let mut ad = build(rec, req, w, 1);
    set(
        &mut ad,
        &[
            ("hada_w1_a", f.w1a.clone()),
            ("hada_w1_b", f.w1b.clone()),
            ("hada_w2_a", f.w2a.clone()),
            ("hada_w2_b", f.w2b.clone()),
        ],
    );
    ad
}

#[test]
fn delta_and_output_match_peft() {
    for (seed, r, alpha) in [(1, 2, 4.0f32), (2, 3, 1.0), (3, 1, 16.0)] {
        let f = random_factors(seed, r);
        let w = Rng(seed + 50).mat(OUT, IN);
        let ad = adapter_with(&f, &w, r as u32, alpha);
        let want = peft_delta(&f, alpha as f64 / r as f64);
        assert_close(&evaluate(&ad, &w).v, &want.v, 1e-6, "ΔW");
        let mut rng = Rng(seed + 100);
        let x = rng.mat(4, IN);
        let bias = rng.vec(OUT);
        assert_close(
            &forward(&ad, &x, &w, &bias).v,
            &linear(&x, &w.add(&want), &bias).v,
            1e-5,
            "y",
        );
    }
}

#[test]
fn gradients_match_pefts_hada_weight_backward() {
    let (r, alpha) = (3usize, 6.0f32);
    let f = random_factors(7, r);
    let w = Rng(8).mat(OUT, IN);
    let g = Rng(9).mat(OUT, IN);
    let got = grads(&adapter_with(&f, &w, r as u32, alpha), &w, &g);
    let want = peft_backward(&f, alpha as f64 / r as f64, &g);
    for (name, want) in ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        .iter()
        .zip(&want)
    {
        assert_close(&got[*name], &want.v, 1e-5, name);
    }
}

#[test]
fn init_is_pefts() {
    let w = Rng(3).mat(OUT, IN);
    let r = 4u32;
    // init_weights = true: hada_w2_b zeros, so ΔW = 0; the rest kaiming-uniform(a = √5), whose
    // bound over fan-in n is 1/sqrt(n): r for the _a factors, in for the _b factors.
    let req = request(IN as u32, OUT as u32, r, 8.0);
    let ad = build(
        recipe(&Config::default(), &req).unwrap(),
        req.clone(),
        &w,
        4,
    );
    assert!(
        evaluate(&ad, &w).v.iter().all(|x| *x == 0.0),
        "ΔW = 0 at init"
    );
    let v = values(&ad);
    let shapes: Vec<(&str, Vec<usize>)> = v
        .iter()
        .map(|(k, (s, _))| (k.as_str(), s.clone()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("hada_w1_a", vec![OUT, 4]),
            ("hada_w1_b", vec![4, IN]),
            ("hada_w2_a", vec![OUT, 4]),
            ("hada_w2_b", vec![4, IN])
        ]
    );
    assert_uniform_within(&v["hada_w1_a"].1, 0.5, "hada_w1_a");
    assert_uniform_within(&v["hada_w1_b"].1, 1.0 / (IN as f64).sqrt(), "hada_w1_b");
    assert_uniform_within(&v["hada_w2_a"].1, 0.5, "hada_w2_a");
    assert!(v["hada_w2_b"].1.iter().all(|x| *x == 0.0));

    // init_weights = false: hada_w2_b random too, so ΔW is not zero.
    let config = parse_config(r#"{"init_weights": false}"#).unwrap();
    let ad = build(recipe(&config, &req).unwrap(), req, &w, 5);
    assert_uniform_within(
        &values(&ad)["hada_w2_b"].1,
        1.0 / (IN as f64).sqrt(),
        "hada_w2_b",
    );
    assert!(evaluate(&ad, &w).v.iter().any(|x| *x != 0.0));
}

#[test]
fn bad_configs_are_refused_with_the_key_named() {
    assert_eq!(parse_config("null").unwrap(), Config::default());
    assert!(parse_config(r#"{"init_weights": false}"#).unwrap() != Config::default());
    for (json, want) in [
        (
            r#"{"alpha": 4}"#,
            "unknown field `alpha`, expected `init_weights`",
        ),
        (
            r#"{"init_weights": "lycoris"}"#,
            "`init_weights`: invalid type: string \"lycoris\", expected a boolean",
        ),
    ] {
        let e = parse_config(json).unwrap_err().to_string();
        assert!(
            e.contains("loha: bad [plugin.loha] table") && e.contains(want),
            "{json}: {e}"
        );
    }
    let mut p = cogvx_plugin_loha::builtin();
    let e = p
        .adapter_recipe(&request(0, OUT as u32, 2, 1.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("0 -> 6 features"), "{e}");
}
