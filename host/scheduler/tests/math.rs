//! Properties of the schedules and plans that hold for any config (not tied to the shared cases).

use burn::tensor::{Distribution, Tensor};
use cogvx_model_core::{CpuBackend, CpuDevice};
use cogvx_plugin_api::{PluginKind, SchedulerPlanRequest, StepCoefficients};
use cogvx_scheduler::{
    add_noise, apply_step, builtin_plugins, ddim_plan, dpm_plan, get_velocity, NoiseSchedule,
    PlanExecutor, SchedulerConfig, SchedulerError, TablePrecision,
};

const COGVIDEOX: &str = r#"{
  "_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
  "prediction_type": "v_prediction", "rescale_betas_zero_snr": true, "set_alpha_to_one": true,
  "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing", "trained_betas": null }"#;

fn schedule_with(edit: impl FnOnce(&mut serde_json::Value)) -> NoiseSchedule {
    let mut v: serde_json::Value = serde_json::from_str(COGVIDEOX).unwrap();
    edit(&mut v);
    NoiseSchedule::from_json(&v.to_string(), "test").unwrap()
}

#[test]
fn trailing_leading_linspace_timesteps() {
    let s = schedule_with(|_| {});
    assert_eq!(s.timesteps(5).unwrap(), vec![999, 799, 599, 399, 199]);
    assert_eq!(s.timesteps(1).unwrap(), vec![999]);
    let t50 = s.timesteps(50).unwrap();
    assert_eq!(t50.len(), 50);
    assert_eq!((t50[0], t50[1], t50[49]), (999, 979, 19));
    // 1000 / 3 = 333.33..: np.round(arange(1000, 0, -333.33)) - 1 = [999, 666, 332]
    assert_eq!(s.timesteps(3).unwrap(), vec![999, 666, 332]);
    let lead = schedule_with(|v| {
        v["timestep_spacing"] = "leading".into();
        v["steps_offset"] = 1.into();
    });
    assert_eq!(lead.timesteps(5).unwrap(), vec![801, 601, 401, 201, 1]);
    let lin = schedule_with(|v| v["timestep_spacing"] = "linspace".into());
    // linspace(0, 999, 5) = [0, 249.75, 499.5, 749.25, 999], rounded half to even
    assert_eq!(lin.timesteps(5).unwrap(), vec![999, 749, 500, 250, 0]);
    assert!(s.timesteps(0).is_err());
    // numpy's arange gives 62 values for 61 steps (the last one -1): refused, not silently run.
    let e = s.timesteps(61).unwrap_err().to_string();
    assert!(e.contains("62 timesteps") && e.contains("-1"), "{e}");
    assert_eq!(s.timesteps(60).unwrap().len(), 60);
    assert!(s.timesteps(1001).is_err());
}

#[test]
fn zero_terminal_snr_and_shift() {
    let s = schedule_with(|_| {});
    assert_eq!(s.precision, TablePrecision::F64);
    assert_eq!(s.alphas_cumprod[999], 0.0, "zero terminal SNR");
    assert!(
        s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]),
        "alphas_cumprod decreases"
    );
    // Without the rescale, the shift divides the SNR ᾱ/(1-ᾱ) by snr_shift_scale exactly.
    let plain = schedule_with(|v| {
        v["rescale_betas_zero_snr"] = false.into();
        v["snr_shift_scale"] = 1.0.into();
    });
    let shifted = schedule_with(|v| v["rescale_betas_zero_snr"] = false.into());
    for t in [0usize, 10, 500, 999] {
        let snr = |a: f64| a / (1.0 - a);
        let ratio = snr(plain.alphas_cumprod[t]) / snr(shifted.alphas_cumprod[t]);
        assert!((ratio - 3.0).abs() < 1e-9, "t={t}: ratio {ratio}");
    }
    // Linear betas are float32 in diffusers.
    let lin = schedule_with(|v| {
        v["beta_schedule"] = "linear".into();
        v["beta_start"] = 0.0001.into();
        v["beta_end"] = 0.02.into();
        v["rescale_betas_zero_snr"] = false.into();
        v["snr_shift_scale"] = 1.0.into();
    });
    assert_eq!(lin.precision, TablePrecision::F32);
    assert!(lin.alphas_cumprod.iter().all(|a| *a == (*a as f32) as f64));
    // The classic DDPM schedule ends at ᾱ_999 ≈ 4.04e-5.
    assert!(
        (lin.alphas_cumprod[999] - 4.036e-5).abs() < 1e-7,
        "{}",
        lin.alphas_cumprod[999]
    );
    let tables = s.tables();
    assert_eq!(tables.loss_weights[999], 1.0);
    assert!((tables.loss_weights[500] - 1.0 / (1.0 - s.alphas_cumprod[500])).abs() < 1e-12);
}

/// For every step: the x0 part of `prev` (through sample, x0 and the x0 history when the model
/// predicts one fixed x0) is sqrt(ᾱ_prev), and the noise variance is 1 - ᾱ_prev: the marginal of
/// the forward process at the previous timestep.
fn check_marginals(s: &NoiseSchedule, steps: &[StepCoefficients], n: usize, stochastic: bool) {
    for c in steps {
        let a_t = s.alpha_prod(c.timestep as i64);
        let a_p = s.alpha_prod(s.prev_timestep(c.timestep, n));
        let x0_part = c.sample_coef * a_t.sqrt() + c.x0_coef + c.x0_history.iter().sum::<f64>();
        assert!(
            (x0_part - a_p.sqrt()).abs() < 1e-9,
            "t={}: x0 part {x0_part} vs {}",
            c.timestep,
            a_p.sqrt()
        );
        let var = c.sample_coef.powi(2) * (1.0 - a_t) + c.noise_coef.powi(2);
        assert!(
            (var - (1.0 - a_p)).abs() < 1e-9,
            "t={}: variance {var} vs {}",
            c.timestep,
            1.0 - a_p
        );
        assert_eq!(
            c.noise_coef != 0.0,
            stochastic && a_p < 1.0,
            "t={}",
            c.timestep
        );
    }
}

#[test]
fn ddim_and_dpm_preserve_the_forward_marginals() {
    for spacing in ["trailing", "leading", "linspace"] {
        for (shift, zsnr) in [(3.0, true), (1.0, false)] {
            let s = schedule_with(|v| {
                v["timestep_spacing"] = spacing.into();
                v["snr_shift_scale"] = shift.into();
                v["rescale_betas_zero_snr"] = zsnr.into();
            });
            for n in [1, 4, 7, 50] {
                check_marginals(&s, &ddim_plan(&s, n).unwrap().steps, n, false);
                let dpm = dpm_plan(&s, n).unwrap();
                check_marginals(&s, &dpm.steps, n, true);
                // 2M uses the previous x0 everywhere except on the first and the last step.
                for (i, c) in dpm.steps.iter().enumerate() {
                    let multistep = i > 0 && s.prev_timestep(c.timestep, n) >= 0;
                    assert_eq!(
                        c.x0_history.len(),
                        multistep as usize,
                        "{spacing} n={n} step {i}"
                    );
                }
            }
        }
    }
}

#[test]
fn ddim_with_the_true_velocity_lands_on_the_forward_process() {
    let s = schedule_with(|_| {});
    let device = CpuDevice::default();
    let x0 = Tensor::<CpuBackend, 3>::random([2, 3, 4], Distribution::Normal(0.0, 1.0), &device);
    let eps = Tensor::<CpuBackend, 3>::random([2, 3, 4], Distribution::Normal(0.0, 1.0), &device);
    let n = 5;
    let plan = ddim_plan(&s, n).unwrap();
    let mut ex = PlanExecutor::<CpuBackend, 3>::new(plan).unwrap();
    let ac = &s.alphas_cumprod;
    let mut sample = add_noise(ac, x0.clone(), eps.clone(), &[999]).unwrap();
    while let Some(t) = ex.current_timestep() {
        // v = sqrt(ᾱ) eps - sqrt(1 - ᾱ) x0 = get_velocity(x0, eps, t)
        let v = get_velocity(ac, x0.clone(), eps.clone(), &[t as usize]).unwrap();
        let out = ex.step(sample, v, None).unwrap();
        let err = (out.pred_original_sample.clone() - x0.clone())
            .abs()
            .max()
            .into_scalar();
        assert!(err < 1e-5, "t={t}: x0 error {err}");
        let prev_t = s.prev_timestep(t, n);
        let want = if prev_t >= 0 {
            add_noise(ac, x0.clone(), eps.clone(), &[prev_t as usize]).unwrap()
        } else {
            x0.clone()
        };
        let err = (out.prev_sample.clone() - want).abs().max().into_scalar();
        assert!(err < 1e-5, "t={t}: prev error {err}");
        sample = out.prev_sample;
    }
    assert!(ex.current_timestep().is_none());
    assert!(
        ex.step(sample.clone(), sample, None).is_err(),
        "stepping past the end is an error"
    );
}

#[test]
fn executor_requires_noise_and_history_it_uses() {
    let device = CpuDevice::default();
    let x = Tensor::<CpuBackend, 2>::ones([2, 2], &device);
    let noisy = StepCoefficients {
        timestep: 10,
        x0_sample: 1.0,
        x0_model_output: 0.0,
        sample_coef: 0.5,
        model_output_coef: 0.0,
        x0_coef: 0.0,
        x0_history: vec![],
        noise_coef: 0.1,
    };
    let e = apply_step(&noisy, x.clone(), x.clone(), &[], None).unwrap_err();
    assert!(e.to_string().contains("no noise tensor"), "{e}");
    let out = apply_step(
        &noisy,
        x.clone(),
        x.clone(),
        &[],
        Some(x.clone().mul_scalar(2.0)),
    )
    .unwrap();
    assert!((out.prev_sample.mean().into_scalar() - 0.7).abs() < 1e-6);
    let multistep = StepCoefficients {
        x0_history: vec![0.25],
        noise_coef: 0.0,
        ..noisy
    };
    let e = apply_step(&multistep, x.clone(), x.clone(), &[], None).unwrap_err();
    assert!(e.to_string().contains("1 step(s) earlier"), "{e}");
    let out = apply_step(
        &multistep,
        x.clone(),
        x.clone(),
        &[x.clone().mul_scalar(4.0)],
        None,
    )
    .unwrap();
    assert!((out.prev_sample.mean().into_scalar() - 1.5).abs() < 1e-6);
    let wrong = Tensor::<CpuBackend, 2>::ones([2, 3], &device);
    assert!(matches!(
        apply_step(&multistep, x.clone(), wrong, &[], None),
        Err(SchedulerError::Shape(_))
    ));
}

#[test]
fn dpm_executor_keeps_the_previous_x0() {
    // Replays the plan by hand: prev = sample_coef*s + x0_coef*x0 + hist*x0_old + noise_coef*n.
    let s = schedule_with(|_| {});
    let plan = dpm_plan(&s, 4).unwrap();
    let device = CpuDevice::default();
    let mut ex = PlanExecutor::<CpuBackend, 2>::new(plan.clone()).unwrap();
    let mut sample =
        Tensor::<CpuBackend, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), &device);
    let mut manual = sample.clone();
    let mut old_x0: Option<Tensor<CpuBackend, 2>> = None;
    for c in &plan.steps {
        let mo = Tensor::<CpuBackend, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), &device);
        let noise =
            Tensor::<CpuBackend, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), &device);
        assert_eq!(ex.needs_noise(), c.noise_coef != 0.0);
        let x0 = manual.clone().mul_scalar(c.x0_sample) + mo.clone().mul_scalar(c.x0_model_output);
        let mut want = manual.clone().mul_scalar(c.sample_coef)
            + x0.clone().mul_scalar(c.x0_coef)
            + noise.clone().mul_scalar(c.noise_coef);
        if let Some(h) = c.x0_history.first() {
            want = want + old_x0.clone().unwrap().mul_scalar(*h);
        }
        old_x0 = Some(x0);
        manual = want;
        sample = ex.step(sample, mo, Some(noise)).unwrap().prev_sample;
        let err = (sample.clone() - manual.clone()).abs().max().into_scalar();
        assert!(err < 1e-5, "t={}: {err}", c.timestep);
    }
}

#[test]
fn builtin_plugins_answer_the_scheduler_calls() {
    let plugins = builtin_plugins();
    let names: Vec<String> = plugins.iter().map(|p| p.info().name).collect();
    assert_eq!(names, vec!["cogvideox-ddim", "cogvideox-dpm"]);
    for mut p in plugins {
        assert_eq!(p.info().kinds, vec![PluginKind::Scheduler]);
        let tables = p.scheduler_tables(COGVIDEOX).unwrap();
        assert_eq!(tables.alphas_cumprod.len(), 1000);
        let plan = p
            .scheduler_plan(&SchedulerPlanRequest {
                config_json: COGVIDEOX.into(),
                num_inference_steps: 50,
            })
            .unwrap();
        assert_eq!(plan.steps.len(), 50);
        let bad = p.scheduler_plan(&SchedulerPlanRequest {
            config_json: "{".into(),
            num_inference_steps: 5,
        });
        assert!(bad.unwrap_err().to_string().contains("not valid JSON"));
    }
}

#[test]
fn config_errors_name_the_key() {
    let e = SchedulerConfig::from_json(r#"{"beta_schedule": "cosine"}"#, "x/scheduler_config.json")
        .unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("x/scheduler_config.json")
            && m.contains("beta_schedule")
            && m.contains("scaled_linear"),
        "{m}"
    );
    let e = SchedulerConfig::from_json(r#"{"num_train_timesteps": "1000"}"#, "c.json").unwrap_err();
    assert!(e.to_string().contains("num_train_timesteps"), "{e}");
    let e = SchedulerConfig::from_json(r#"{"timestep_spacing": "middle"}"#, "c.json").unwrap_err();
    assert!(e.to_string().contains("timestep_spacing"), "{e}");
    // Unknown keys are ignored, as diffusers does; absent keys take diffusers' defaults.
    let c = SchedulerConfig::from_json(r#"{"_diffusers_version": "0.42.1", "foo": 1}"#, "c.json")
        .unwrap();
    assert_eq!(c, SchedulerConfig::default());
    // Epsilon prediction cannot be sampled at zero terminal SNR: a clear error, not NaNs.
    let s = schedule_with(|v| v["prediction_type"] = "epsilon".into());
    let e = ddim_plan(&s, 5).unwrap_err();
    assert!(e.to_string().contains("zero terminal SNR"), "{e}");
}
