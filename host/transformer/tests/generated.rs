//! The model on generated configs and sizes other than the shared cases': layer counts, channel
//! counts, text lengths, latent sizes unlike the sample size, and the errors for bad input.

mod common;

use burn::tensor::Tensor;
use cogvx_transformer::{CogVideoXTransformer3DModel, TransformerConfig, TransformerError};
use common::{random_inputs, write_random_transformer, B};
use std::path::Path;

fn base_config() -> TransformerConfig {
    TransformerConfig {
        num_attention_heads: 3,
        attention_head_dim: 16,
        in_channels: 6,
        out_channels: Some(5),
        time_embed_dim: 24,
        text_embed_dim: 20,
        num_layers: 3,
        sample_width: 14,
        sample_height: 10,
        sample_frames: 13,
        max_text_seq_length: 7,
        ..Default::default()
    }
}

fn load(dir: &Path) -> CogVideoXTransformer3DModel<B> {
    CogVideoXTransformer3DModel::<B>::from_dir(dir, &Default::default()).unwrap()
}

fn run(
    model: &CogVideoXTransformer3DModel<B>,
    batch: usize,
    frames: usize,
    height: usize,
    width: usize,
    text_len: usize,
) -> Result<Tensor<B, 5>, TransformerError> {
    let (x, ctx, t, ofs) = random_inputs(&model.config, batch, frames, height, width, text_len, 7);
    let rot = model.image_rotary_emb(frames, height, width, &Default::default())?;
    model.forward(x, ctx, t, ofs, rot.as_ref())
}

fn values(t: Tensor<B, 5>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max <= tol, "max |diff| {max} > {tol}");
}

/// 2B-style (sincos): an input size other than the sample size recomputes the table, and gives
/// what a model whose sample size *is* that size computes from its init-time table.
#[test]
fn sincos_table_is_recomputed_for_other_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a");
    let config = base_config();
    write_random_transformer(&a_dir, &config, 1, 1.0);
    let a = load(&a_dir);
    assert_eq!(a.transformer_blocks.len(), 3);
    // Latent 2 x 6 x 8 (sample is 4 x 10 x 14): recompute path.
    let out_a = run(&a, 2, 2, 6, 8, 7).unwrap();
    assert_eq!(out_a.dims(), [2, 2, 5, 6, 8]);
    let out_a = values(out_a);
    assert!(out_a.iter().all(|v| v.is_finite()));
    // The recomputed table is cached per size: another size in between, then the same again.
    assert_eq!(run(&a, 1, 3, 4, 6, 7).unwrap().dims(), [1, 3, 5, 4, 6]);
    assert_close(&out_a, &values(run(&a, 2, 2, 6, 8, 7).unwrap()), 0.0);
    assert_close(&out_a, &values(run(&a, 2, 2, 6, 8, 7).unwrap()), 0.0);

    // Same weights, sample size = the input size: the stored table is used.
    let b_dir = tmp.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::copy(
        a_dir.join("diffusion_pytorch_model.safetensors"),
        b_dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let b_config = TransformerConfig {
        sample_height: 6,
        sample_width: 8,
        sample_frames: 5,
        ..config.clone()
    };
    std::fs::write(
        b_dir.join("config.json"),
        serde_json::to_string(&b_config).unwrap(),
    )
    .unwrap();
    let b = load(&b_dir);
    assert_eq!(
        b.patch_embed.pos_embedding.as_ref().unwrap().dims(),
        [1, 7 + 2 * 3 * 4, 48]
    );
    let out_b = values(run(&b, 2, 2, 6, 8, 7).unwrap());
    assert_close(&out_a, &out_b, 1e-6);

    // The table matters: a model without it (RoPE config, no tables passed) differs.
    let c_dir = tmp.path().join("c");
    std::fs::create_dir_all(&c_dir).unwrap();
    std::fs::copy(
        a_dir.join("diffusion_pytorch_model.safetensors"),
        c_dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let c_config = TransformerConfig {
        use_rotary_positional_embeddings: true,
        ..config
    };
    std::fs::write(
        c_dir.join("config.json"),
        serde_json::to_string(&c_config).unwrap(),
    )
    .unwrap();
    let c = load(&c_dir);
    let (x, ctx, t, _) = random_inputs(&c.config, 2, 2, 6, 8, 7, 7);
    let out_c = values(c.forward(x, ctx, t, None, None).unwrap());
    let diff = out_a
        .iter()
        .zip(&out_c)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-3, "the positional table had no effect");
}

/// 1.0 RoPE at a size unlike the sample size (crop region), and a batch of one.
#[test]
fn rope_linspace_config_runs_at_other_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let config = TransformerConfig {
        use_rotary_positional_embeddings: true,
        num_layers: 1,
        ..base_config()
    };
    write_random_transformer(tmp.path(), &config, 2, 1.0);
    let model = load(tmp.path());
    let out = run(&model, 1, 5, 6, 10, 11).unwrap();
    assert_eq!(out.dims(), [1, 5, 5, 6, 10]);
    // RoPE changes the result.
    let (x, ctx, t, _) = random_inputs(&model.config, 1, 5, 6, 10, 11, 7);
    let plain = values(model.forward(x, ctx, t, None, None).unwrap());
    let roped = values(out);
    assert!(roped.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3));
}

/// 1.5-I2V style: `patch_size_t = 2`, `ofs`, slice-grid RoPE, 4 layers, non-square latents.
#[test]
fn patch_size_t_and_ofs_config() {
    let tmp = tempfile::tempdir().unwrap();
    let config = TransformerConfig {
        use_rotary_positional_embeddings: true,
        patch_size_t: Some(2),
        patch_bias: false,
        ofs_embed_dim: Some(24),
        in_channels: 8,
        out_channels: Some(4),
        num_layers: 4,
        ..base_config()
    };
    write_random_transformer(tmp.path(), &config, 3, 1.0);
    let model = load(tmp.path());
    let out = run(&model, 2, 6, 4, 10, 5).unwrap();
    assert_eq!(out.dims(), [2, 6, 4, 4, 10]);
    assert!(values(out).iter().all(|v| v.is_finite()));
    // ofs enters the conditioning.
    let (x, ctx, t, _) = random_inputs(&model.config, 1, 2, 4, 4, 5, 9);
    let rot = model
        .image_rotary_emb(2, 4, 4, &Default::default())
        .unwrap();
    let dev = Default::default();
    let o1 = values(
        model
            .forward(
                x.clone(),
                ctx.clone(),
                t.clone(),
                Some(Tensor::from_floats([2.0], &dev)),
                rot.as_ref(),
            )
            .unwrap(),
    );
    let o2 = values(
        model
            .forward(
                x,
                ctx,
                t,
                Some(Tensor::from_floats([5.0], &dev)),
                rot.as_ref(),
            )
            .unwrap(),
    );
    assert!(o1.iter().zip(&o2).any(|(a, b)| (a - b).abs() > 1e-4));
}

/// 5B-I2V style: learned positional table of the sample size; other sizes are refused as in diffusers.
#[test]
fn learned_positional_embedding_config() {
    let tmp = tempfile::tempdir().unwrap();
    let config = TransformerConfig {
        use_rotary_positional_embeddings: true,
        use_learned_positional_embeddings: true,
        num_layers: 1,
        ..base_config()
    };
    write_random_transformer(tmp.path(), &config, 4, 1.0);
    let model = load(tmp.path());
    assert_eq!(
        run(&model, 1, 4, 10, 14, 7).unwrap().dims(),
        [1, 4, 5, 10, 14]
    );
    let err = run(&model, 1, 4, 6, 8, 7).unwrap_err().to_string();
    assert!(err.contains("learned positional embeddings"), "{err}");
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let config = TransformerConfig {
        use_rotary_positional_embeddings: true,
        patch_size_t: Some(2),
        ofs_embed_dim: Some(24),
        num_layers: 1,
        ..base_config()
    };
    write_random_transformer(tmp.path(), &config, 5, 1.0);
    let model = load(tmp.path());
    let dev = Default::default();
    let expect_err = |r: Result<Tensor<B, 5>, TransformerError>, what: &str| {
        let e = r
            .err()
            .unwrap_or_else(|| panic!("expected an error about {what}"))
            .to_string();
        assert!(e.contains(what), "{e}");
    };
    // Odd frame count for patch_size_t = 2.
    let (x, ctx, t, ofs) = random_inputs(&model.config, 1, 3, 4, 4, 5, 1);
    expect_err(model.forward(x, ctx, t, ofs, None), "patch_size_t");
    // Missing ofs.
    let (x, ctx, t, _) = random_inputs(&model.config, 1, 2, 4, 4, 5, 1);
    expect_err(model.forward(x, ctx, t, None, None), "ofs");
    // Wrong RoPE table for the size.
    let (x, ctx, t, ofs) = random_inputs(&model.config, 1, 2, 4, 4, 5, 1);
    let rot = model.image_rotary_emb(4, 4, 4, &dev).unwrap();
    expect_err(model.forward(x, ctx, t, ofs, rot.as_ref()), "RoPE table");
    // Slice grid larger than the model's maximum (sample 10 x 14 -> 5 x 7 patches).
    expect_err(run(&model, 1, 2, 12, 4, 5), "exceeds");
    // Odd height.
    let (x, ctx, t, ofs) = random_inputs(&model.config, 1, 2, 5, 4, 5, 1);
    expect_err(
        model.forward(x, ctx, t, ofs, None),
        "multiples of patch_size",
    );
    // Wrong channel count / text width.
    let (x, ctx, t, ofs) = random_inputs(&model.config, 1, 2, 4, 4, 5, 1);
    let x = x.narrow(2, 0, 4);
    expect_err(model.forward(x, ctx, t, ofs, None), "in_channels");
    let (x, ctx, t, ofs) = random_inputs(&model.config, 1, 2, 4, 4, 5, 1);
    expect_err(
        model.forward(x, ctx.narrow(2, 0, 10), t, ofs, None),
        "encoder_hidden_states",
    );
    // Sincos model with a text length other than max_text_seq_length.
    let tmp2 = tempfile::tempdir().unwrap();
    let sincos = TransformerConfig {
        num_layers: 1,
        ..base_config()
    };
    write_random_transformer(tmp2.path(), &sincos, 6, 1.0);
    let model = load(tmp2.path());
    expect_err(run(&model, 1, 2, 4, 4, 9), "max_text_seq_length");
}

#[test]
fn loading_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let config = TransformerConfig {
        num_layers: 2,
        ..base_config()
    };
    write_random_transformer(tmp.path(), &config, 7, 1.0);
    // A config with more layers than the weights: every missing key is listed.
    let more = TransformerConfig {
        num_layers: 3,
        ..config.clone()
    };
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_string(&more).unwrap(),
    )
    .unwrap();
    let err = CogVideoXTransformer3DModel::<B>::from_dir(tmp.path(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing key `transformer_blocks.2.attn1.to_q.weight`"),
        "{err}"
    );
    assert!(
        err.contains("missing key `transformer_blocks.2.ff.net.2.bias`"),
        "{err}"
    );
    // Fewer layers: the extra keys are unexpected.
    let fewer = TransformerConfig {
        num_layers: 1,
        ..config.clone()
    };
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_string(&fewer).unwrap(),
    )
    .unwrap();
    let err = CogVideoXTransformer3DModel::<B>::from_dir(tmp.path(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected key `transformer_blocks.1.norm1.linear.weight`"),
        "{err}"
    );
    // A different width: wrong shapes.
    let wider = TransformerConfig {
        text_embed_dim: 21,
        ..config
    };
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_string(&wider).unwrap(),
    )
    .unwrap();
    let err = CogVideoXTransformer3DModel::<B>::from_dir(tmp.path(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wrong shape for `patch_embed.text_proj.weight`"),
        "{err}"
    );
    // An unsupported config value names the file and key.
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"activation_fn": "geglu"}"#,
    )
    .unwrap();
    let err = CogVideoXTransformer3DModel::<B>::from_dir(tmp.path(), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("activation_fn"),
        "{err}"
    );
}

/// The model is generic over the backend: on the autodiff backend, gradients reach the attention
/// projections, the adaLN linears and the patch embedding (what the trainer relies on).
#[test]
fn gradients_flow_on_the_autodiff_backend() {
    use burn::module::Module;
    type AD = cogvx_model_core::CpuAutodiffBackend;
    let tmp = tempfile::tempdir().unwrap();
    let config = TransformerConfig {
        use_rotary_positional_embeddings: true,
        patch_size_t: Some(2),
        ofs_embed_dim: Some(24),
        num_layers: 2,
        ..base_config()
    };
    write_random_transformer(tmp.path(), &config, 8, 1.0);
    let dev = Default::default();
    let model = CogVideoXTransformer3DModel::<AD>::from_dir(tmp.path(), &dev).unwrap();
    let (x, ctx, t, ofs) = random_inputs(&config, 1, 2, 4, 6, 5, 3);
    let rot = model.image_rotary_emb(2, 4, 6, &dev).unwrap();
    let out = model
        .forward(
            Tensor::from_inner(x),
            Tensor::from_inner(ctx),
            Tensor::from_inner(t),
            ofs.map(Tensor::from_inner),
            rot.as_ref(),
        )
        .unwrap();
    let grads = out.powf_scalar(2.0).mean().backward();
    let norm = |p: &burn::module::Param<Tensor<AD, 2>>| -> f32 {
        let g = p.val().grad(&grads).expect("gradient present");
        g.powf_scalar(2.0).sum().into_scalar()
    };
    let block = &model.transformer_blocks[0];
    for (name, p) in [
        ("attn1.to_q", &block.attn1.to_q.weight),
        ("attn1.to_out.0", &block.attn1.to_out.0.weight),
        ("norm1.linear", &block.norm1.linear.weight),
        ("ff.net.2", &block.ff.net.2.weight),
        ("patch_embed.proj", &model.patch_embed.proj.weight),
        (
            "ofs_embedding.linear_1",
            &model.ofs_embedding.as_ref().unwrap().linear_1.weight,
        ),
    ] {
        let n = norm(p);
        assert!(n.is_finite() && n > 0.0, "{name}: grad norm^2 {n}");
    }
    assert!(model.num_params() > 0);
}
