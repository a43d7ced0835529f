//! The LoKr recipe, run by the host's interpreter, against PEFT's formulas written out by hand
//! in f64: PEFT's factor shapes and full/decomposed choice, weight delta, layer output,
//! gradients (analytic, checked by finite differences), the three initialisations, export
//! names and config errors.

use cogvx_model_core::recipe_testing as common;

use cogvx_plugin_api::AdapterOutput;
use cogvx_plugin_lokr::{layout, parse_config, recipe, Config, LokrInit};
use common::*;
use std::collections::BTreeMap;

/// Random values for every parameter of the recipe for `(in, out, r)` under `config`.
fn random_params(config: &Config, inf: u32, outf: u32, r: u32, seed: u64) -> BTreeMap<String, Mat> {
    let l = layout(config, inf, outf, r);
    let (r, (ol, ok), (im, in_)) = (
        r as usize,
        (l.out.0 as usize, l.out.1 as usize),
        (l.inp.0 as usize, l.inp.1 as usize),
    );
    let mut rng = Rng(seed);
    let mut p = BTreeMap::new();
    if l.use_w1 {
        p.insert("lokr_w1".to_string(), rng.mat(ol, im));
    } else {
        p.insert("lokr_w1_a".to_string(), rng.mat(ol, r));
        p.insert("lokr_w1_b".to_string(), rng.mat(r, im));
    }
    if l.use_w2 {
        p.insert("lokr_w2".to_string(), rng.mat(ok, in_));
    } else {
        p.insert("lokr_w2_a".to_string(), rng.mat(ok, r));
        p.insert("lokr_w2_b".to_string(), rng.mat(r, in_));
    }
    p
}

fn w1(p: &BTreeMap<String, Mat>) -> Mat {
    p.get("lokr_w1")
        .cloned()
        .unwrap_or_else(|| p["lokr_w1_a"].matmul(&p["lokr_w1_b"]))
}

fn w2(p: &BTreeMap<String, Mat>) -> Mat {
    p.get("lokr_w2")
        .cloned()
        .unwrap_or_else(|| p["lokr_w2_a"].matmul(&p["lokr_w2_b"]))
}

/// PEFT's `get_delta_weight`: `make_kron(w1, w2, scaling)` = `torch.kron(w1, w2) * alpha / r`.
fn peft_delta(p: &BTreeMap<String, Mat>, scale: f64) -> Mat {
    w1(p).kron(&w2(p)).scale(scale)
}

/// Gradients of `L = Σ ΔW ⊙ g`, analytic.
fn reference_grads(p: &BTreeMap<String, Mat>, scale: f64, g: &Mat) -> BTreeMap<String, Mat> {
    let (a, b) = (w1(p), w2(p));
    let g = g.scale(scale);
    let (mut da, mut db) = (Mat::zeros(a.rows, a.cols), Mat::zeros(b.rows, b.cols));
    for i in 0..a.rows {
        for j in 0..a.cols {
            for k in 0..b.rows {
                for l in 0..b.cols {
                    let gk = g.at(i * b.rows + k, j * b.cols + l);
                    da.v[i * a.cols + j] += gk * b.at(k, l);
                    db.v[k * b.cols + l] += gk * a.at(i, j);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for (full, a_name, b_name, d) in [
        ("lokr_w1", "lokr_w1_a", "lokr_w1_b", &da),
        ("lokr_w2", "lokr_w2_a", "lokr_w2_b", &db),
    ] {
        if p.contains_key(full) {
            out.insert(full.to_string(), d.clone());
        } else {
            out.insert(a_name.to_string(), d.matmul(&p[b_name].t()));
            out.insert(b_name.to_string(), p[a_name].t().matmul(d));
        }
    }
    out
}

fn adapter_with(
    config: &Config,
    p: &BTreeMap<String, Mat>,
    w: &Mat,
    r: u32,
    alpha: f32,
) -> cogvx_model_core::adapter::LinearAdapter<AD> {
    let req = request(w.cols as u32, w.rows as u32, r, alpha);
    let rec = recipe(config, &req).unwrap();
    assert_eq!(
        (rec.output_kind, rec.peft_type.as_str()),
        (AdapterOutput::WeightDelta, "LOKR")
    );
    let mut ad = build(rec, req, w, 1);
    let values: Vec<(&str, Mat)> = p.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    set(&mut ad, &values);
    ad
}

/// (config, in, out, rank, which parameters PEFT creates).
fn layouts() -> Vec<(Config, u32, u32, u32, Vec<&'static str>)> {
    let both = Config {
        decompose_both: true,
        ..Config::default()
    };
    let f2 = Config {
        decompose_factor: 2,
        ..Config::default()
    };
    vec![
        // 12 = 3 x 4, 8 = 2 x 4; r = 1 < max(4, 4) / 2: w2 decomposed.
        (
            Config::default(),
            12,
            8,
            1,
            vec!["lokr_w1", "lokr_w2_a", "lokr_w2_b"],
        ),
        // r = 2 = 4 / 2 is not smaller: w2 full.
        (Config::default(), 12, 8, 2, vec!["lokr_w1", "lokr_w2"]),
        // decompose_both, r = 1 < max(2, 3) / 2: w1 decomposed too.
        (
            both.clone(),
            12,
            8,
            1,
            vec!["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"],
        ),
        (both, 12, 8, 2, vec!["lokr_w1", "lokr_w2"]),
        // decompose_factor 2: 12 = 2 x 6, 8 = 2 x 4; r = 2 < 6 / 2.
        (f2, 12, 8, 2, vec!["lokr_w1", "lokr_w2_a", "lokr_w2_b"]),
        // A prime input: 7 = 1 x 7.
        (
            Config::default(),
            7,
            6,
            1,
            vec!["lokr_w1", "lokr_w2_a", "lokr_w2_b"],
        ),
    ]
}

#[test]
fn shapes_and_export_names_are_pefts() {
    for (config, inf, outf, r, names) in layouts() {
        let req = request(inf, outf, r, 1.0);
        let ad = build(
            recipe(&config, &req).unwrap(),
            req,
            &Rng(1).mat(outf as usize, inf as usize),
            2,
        );
        let got = values(&ad);
        let want = random_params(&config, inf, outf, r, 0);
        assert_eq!(
            got.keys().map(String::as_str).collect::<Vec<_>>(),
            names,
            "{config:?} {inf} -> {outf} r{r}"
        );
        for (k, m) in &want {
            assert_eq!(got[k].0, vec![m.rows, m.cols], "{k}");
        }
    }
    let l = layout(&Config::default(), 12, 8, 1);
    assert_eq!((l.out, l.inp), ((2, 4), (3, 4)));
}

#[test]
fn delta_and_output_match_peft() {
    for (i, (config, inf, outf, r, _)) in layouts().into_iter().enumerate() {
        let alpha = 2.0 + i as f32;
        let p = random_params(&config, inf, outf, r, 10 + i as u64);
        let w = Rng(20 + i as u64).mat(outf as usize, inf as usize);
        let ad = adapter_with(&config, &p, &w, r, alpha);
        let want = peft_delta(&p, alpha as f64 / r as f64);
        assert_close(
            &evaluate(&ad, &w).v,
            &want.v,
            1e-6,
            &format!("ΔW {config:?} r{r}"),
        );
        let mut rng = Rng(30 + i as u64);
        let x = rng.mat(3, inf as usize);
        let bias = rng.vec(outf as usize);
        assert_close(
            &forward(&ad, &x, &w, &bias).v,
            &linear(&x, &w.add(&want), &bias).v,
            1e-5,
            "y",
        );
    }
}

#[test]
fn gradients_match_the_analytic_kron_gradients() {
    for (i, (config, inf, outf, r, _)) in layouts().into_iter().enumerate() {
        let alpha = 3.0f32;
        let scale = alpha as f64 / r as f64;
        let p = random_params(&config, inf, outf, r, 40 + i as u64);
        let w = Rng(50).mat(outf as usize, inf as usize);
        let g = Rng(60 + i as u64).mat(outf as usize, inf as usize);
        let got = grads(&adapter_with(&config, &p, &w, r, alpha), &w, &g);
        let want = reference_grads(&p, scale, &g);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (k, want) in &want {
            assert_close(&got[k], &want.v, 1e-5, &format!("dL/d{k} {config:?} r{r}"));
            // The analytic reference by central finite differences in f64.
            let h = 1e-6;
            for e in 0..want.v.len() {
                let (mut plus, mut minus) = (p.clone(), p.clone());
                plus.get_mut(k).unwrap().v[e] += h;
                minus.get_mut(k).unwrap().v[e] -= h;
                let fd = (peft_delta(&plus, scale).dot(&g) - peft_delta(&minus, scale).dot(&g))
                    / (2.0 * h);
                assert!(
                    (fd - want.v[e]).abs() < 1e-6,
                    "finite difference of {k}[{e}]: {fd} vs {}",
                    want.v[e]
                );
            }
        }
    }
}

#[test]
fn inits_are_pefts() {
    let w = Rng(1).mat(8, 12);
    for (config, inf, outf, r, _) in layouts().into_iter().filter(|l| l.1 == 12) {
        for init in [LokrInit::Peft, LokrInit::Lycoris, LokrInit::Random] {
            let config = Config {
                init_weights: init,
                ..config.clone()
            };
            let req = request(inf, outf, r, 4.0);
            let ad = build(recipe(&config, &req).unwrap(), req, &w, 3);
            let v = values(&ad);
            let zero_names: &[&str] = match init {
                LokrInit::Peft => &["lokr_w1", "lokr_w1_a"],
                LokrInit::Lycoris => &["lokr_w2", "lokr_w2_b"],
                LokrInit::Random => &[],
            };
            for (k, (shape, x)) in &v {
                if zero_names.contains(&k.as_str()) {
                    assert!(
                        x.iter().all(|x| *x == 0.0),
                        "{init:?}: {k} should start at zero"
                    );
                } else {
                    // kaiming_uniform_(a = √5): bound 1/sqrt(fan-in), the last dimension.
                    assert_uniform_within(
                        x,
                        1.0 / (shape[1] as f64).sqrt(),
                        &format!("{init:?}: {k}"),
                    );
                }
            }
            let delta = evaluate(&ad, &w);
            let zero = delta.v.iter().all(|x| *x == 0.0);
            assert_eq!(
                zero,
                init != LokrInit::Random,
                "{init:?} {config:?} r{r}: ΔW zero at init = {zero}"
            );
        }
    }
}

#[test]
fn bad_configs_are_refused_with_the_key_named() {
    assert_eq!(parse_config("{}").unwrap(), Config::default());
    assert_eq!(
        parse_config(
            r#"{"decompose_factor": 8, "decompose_both": true, "init_weights": "lycoris"}"#
        )
        .unwrap(),
        Config {
            decompose_factor: 8,
            decompose_both: true,
            init_weights: LokrInit::Lycoris
        }
    );
    assert_eq!(
        parse_config(r#"{"init_weights": false}"#)
            .unwrap()
            .init_weights,
        LokrInit::Random
    );
    for (json, want) in [
        (
            r#"{"decompose_factor": 0}"#,
            "`decompose_factor`: 0 must be -1",
        ),
        (
            r#"{"decompose_factor": -4}"#,
            "`decompose_factor`: -4 must be -1",
        ),
        (
            r#"{"decompose_factor": 2.5}"#,
            "`decompose_factor`: invalid type: floating point `2.5`, expected i64",
        ),
        (
            r#"{"decompose_both": 1}"#,
            "`decompose_both`: invalid type: integer `1`, expected a boolean",
        ),
        (
            r#"{"init_weights": "gaussian"}"#,
            "`init_weights`: \"gaussian\" is not a LoKr initialisation",
        ),
        (
            r#"{"use_effective_conv2d": true}"#,
            "unknown field `use_effective_conv2d`",
        ),
    ] {
        let e = parse_config(json).unwrap_err().to_string();
        assert!(
            e.contains("lokr: bad [plugin.lokr] table") && e.contains(want),
            "{json}: {e}"
        );
        assert!(!e.contains(" at line "), "{e}");
    }
}
