//! Parameter counts of the three models, from their configs alone.
//!
//! Each count mirrors the `load` functions of the model crates tensor by tensor (the same
//! shapes, biases and optional modules), so it equals the element count of every tensor the
//! checkpoint stores: `host/plan/tests/params.rs` checks that against the reference checkpoints.
//! Arithmetic is `u64` and saturating: an absurd config gives a huge count, never a panic.

use cogvx_text::T5Config;
use cogvx_transformer::TransformerConfig;
use cogvx_vae::VaeConfig;

fn n(x: usize) -> u64 {
    x as u64
}

fn mul(a: u64, b: u64) -> u64 {
    a.saturating_mul(b)
}

fn sum<const N: usize>(xs: [u64; N]) -> u64 {
    xs.into_iter().fold(0, u64::saturating_add)
}

/// `Linear(i, o)`: weight `[o, i]` and, with `bias`, `[o]`.
fn linear(i: u64, o: u64, bias: bool) -> u64 {
    mul(i, o).saturating_add(if bias { o } else { 0 })
}

/// `LayerNorm(d)` with affine weight and bias (nothing without `elementwise_affine`).
fn layer_norm(d: u64, affine: bool) -> u64 {
    if affine {
        mul(2, d)
    } else {
        0
    }
}

/// Weight `[o, i, k, k, k]` and bias `[o]` (`CogVideoXSafeConv3d`, also inside `CausalConv3d`).
fn conv3d(i: u64, o: u64, k: u64) -> u64 {
    mul(mul(o, i), mul(k, mul(k, k))).saturating_add(o)
}

/// Weight `[o, i, k, k]` and bias `[o]` (the samplers' `Conv2d`).
fn conv2d(i: u64, o: u64, k: u64) -> u64 {
    mul(mul(o, i), mul(k, k)).saturating_add(o)
}

/// `GroupNorm(c)`: weight and bias `[c]`.
fn group_norm(c: u64) -> u64 {
    mul(2, c)
}

// ---------------------------------------------------------------------------------------------
// Transformer

/// `num_attention_heads * attention_head_dim`, saturating.
fn inner_dim(c: &TransformerConfig) -> u64 {
    mul(n(c.num_attention_heads), n(c.attention_head_dim))
}

/// `TimestepEmbedding(i, e)`: `linear_1` (`i -> e`) and `linear_2` (`e -> e`), with biases.
fn timestep_embedding(i: u64, e: u64) -> u64 {
    linear(i, e, true).saturating_add(linear(e, e, true))
}

/// `CogVideoXLayerNormZero`: `linear` (`E -> 6 D`) and the shared LayerNorm.
fn layer_norm_zero(c: &TransformerConfig) -> u64 {
    let d = inner_dim(c);
    linear(n(c.time_embed_dim), mul(6, d), true)
        .saturating_add(layer_norm(d, c.norm_elementwise_affine))
}

/// Parameters of one `CogVideoXBlock`: `norm1` and `norm2` (adaLN-zero linear and LayerNorm),
/// `attn1` (`to_q/k/v` with `attention_bias`, `norm_q/k`, `to_out.0`) and `ff` (`D -> 4D -> D`).
pub fn transformer_block_parameters(c: &TransformerConfig) -> u64 {
    let d = inner_dim(c);
    let head_dim = n(c.attention_head_dim);
    let attn = sum([
        mul(3, linear(d, d, c.attention_bias)),
        // norm_q, norm_k: LayerNorm(head_dim), always affine (eps 1e-6).
        mul(2, layer_norm(head_dim, true)),
        linear(d, d, true),
    ]);
    let ff = linear(d, mul(4, d), true).saturating_add(linear(mul(4, d), d, true));
    sum([mul(2, layer_norm_zero(c)), attn, ff])
}

/// The learned positional table of the 5B-I2V (`pos_embedding`, `[1, max_text_seq_length +
/// patches, D]` at the sample size): a persistent buffer stored in the checkpoint, not trained
/// (as in diffusers); 0 for the other variants (the 2B's sincos table is not persistent).
pub fn learned_positional_parameters(c: &TransformerConfig) -> u64 {
    if !c.use_learned_positional_embeddings {
        return 0;
    }
    let ps = c.patch_size.max(1);
    let frames = (c.sample_frames.max(1) - 1) / c.temporal_compression_ratio.max(1) + 1;
    let patches = mul(
        mul(n(c.sample_height / ps), n(c.sample_width / ps)),
        n(frames),
    );
    mul(
        n(c.max_text_seq_length).saturating_add(patches),
        inner_dim(c),
    )
}

/// Parameters of `CogVideoXTransformer3DModel` (every tensor of its checkpoint): patch embedding
/// (1.0 `Conv2d`, 1.5 `Linear`), `text_proj`, the learned `pos_embedding` (5B-I2V), time and `ofs`
/// embeddings, the blocks, `norm_final`, `norm_out` and `proj_out`.
pub fn transformer_parameters(c: &TransformerConfig) -> u64 {
    let d = inner_dim(c);
    let p = n(c.patch_size);
    let pt = n(c.patch_size_t.unwrap_or(1));
    let e = n(c.time_embed_dim);
    let proj = match c.patch_size_t {
        // Conv2d(in, D, kernel = stride = p), bias per `patch_bias`.
        None => mul(mul(d, n(c.in_channels)), mul(p, p)).saturating_add(if c.patch_bias {
            d
        } else {
            0
        }),
        // Linear(in * p_t * p * p, D), always with bias.
        Some(_) => linear(mul(n(c.in_channels), mul(pt, mul(p, p))), d, true),
    };
    let pos_embedding = learned_positional_parameters(c);
    let patch_embed = sum([proj, linear(n(c.text_embed_dim), d, true), pos_embedding]);
    let ofs = c
        .ofs_embed_dim
        .map_or(0, |o| timestep_embedding(n(o), n(o)));
    let output_dim = mul(mul(p, p), mul(pt, n(c.out_channels())));
    sum([
        patch_embed,
        timestep_embedding(d, e),
        ofs,
        mul(n(c.num_layers), transformer_block_parameters(c)),
        layer_norm(d, c.norm_elementwise_affine),
        // norm_out: AdaLayerNorm (linear E -> 2D, LayerNorm(D)).
        linear(e, mul(2, d), true),
        layer_norm(d, c.norm_elementwise_affine),
        linear(d, output_dim, true),
    ])
}

// ---------------------------------------------------------------------------------------------
// VAE

/// A ResNet norm over `ch` channels: `GroupNorm`, or in the decoder `SpatialNorm3D` (GroupNorm plus
/// the 1x1x1 `conv_y` / `conv_b` from the `zq` latent channels).
fn vae_norm(ch: u64, spatial: Option<u64>) -> u64 {
    group_norm(ch).saturating_add(spatial.map_or(0, |zq| mul(2, conv3d(zq, ch, 1))))
}

/// `CogVideoXResnetBlock3D`: two norms, two 3x3x3 causal convs, a 1x1x1 shortcut when `ic != oc`.
fn resnet(ic: u64, oc: u64, spatial: Option<u64>) -> u64 {
    sum([
        vae_norm(ic, spatial),
        conv3d(ic, oc, 3),
        vae_norm(oc, spatial),
        conv3d(oc, oc, 3),
        if ic != oc { conv3d(ic, oc, 1) } else { 0 },
    ])
}

/// Parameters of the VAE encoder (`encoder.*`: `conv_in`, down blocks with their downsamplers,
/// mid block, `norm_out`, `conv_out`) plus `quant_conv` when `use_quant_conv`: what `prepare` runs.
pub fn vae_encoder_parameters(c: &VaeConfig) -> u64 {
    let ch: Vec<u64> = c.block_out_channels.iter().map(|&x| n(x)).collect();
    let (Some(&first), Some(&last)) = (ch.first(), ch.last()) else {
        return 0;
    };
    let layers = n(c.layers_per_block);
    let mut total = conv3d(n(c.in_channels), first, 3);
    let mut output = first;
    for (i, &oc) in ch.iter().enumerate() {
        let ic = output;
        output = oc;
        // `layers_per_block` resnets: the first maps the previous block's channels.
        if layers > 0 {
            total = sum([
                total,
                resnet(ic, oc, None),
                mul(layers - 1, resnet(oc, oc, None)),
            ]);
        }
        if i + 1 < ch.len() {
            total = total.saturating_add(conv2d(oc, oc, 3));
        }
    }
    let quant = if c.use_quant_conv {
        let q = mul(2, n(c.out_channels));
        conv3d(q, q, 1)
    } else {
        0
    };
    sum([
        total,
        mul(2, resnet(last, last, None)),
        group_norm(last),
        conv3d(last, mul(2, n(c.latent_channels)), 3),
        quant,
    ])
}

/// Parameters of the VAE decoder (`decoder.*`: `conv_in`, mid block and up blocks with spatial
/// norms, upsamplers, `norm_out`, `conv_out`) plus `post_quant_conv` when `use_post_quant_conv`.
pub fn vae_decoder_parameters(c: &VaeConfig) -> u64 {
    let rev: Vec<u64> = c.block_out_channels.iter().rev().map(|&x| n(x)).collect();
    let (Some(&first), Some(&last)) = (rev.first(), rev.last()) else {
        return 0;
    };
    let zc = n(c.latent_channels);
    let z = Some(zc);
    // Decoder blocks have `layers_per_block + 1` resnets: the first maps the previous block's
    // channels, the others keep them.
    let layers = n(c.layers_per_block);
    let mut total = sum([conv3d(zc, first, 3), mul(2, resnet(first, first, z))]);
    let mut output = first;
    for (i, &oc) in rev.iter().enumerate() {
        let ic = output;
        output = oc;
        total = sum([total, resnet(ic, oc, z), mul(layers, resnet(oc, oc, z))]);
        if i + 1 < rev.len() {
            total = total.saturating_add(conv2d(oc, oc, 3));
        }
    }
    let post_quant = if c.use_post_quant_conv {
        let q = n(c.out_channels);
        conv3d(q, q, 1)
    } else {
        0
    };
    sum([
        total,
        vae_norm(last, z),
        conv3d(last, n(c.out_channels), 3),
        post_quant,
    ])
}

/// Parameters of `AutoencoderKLCogVideoX`: encoder, decoder and the optional quant convs
/// (= [`vae_encoder_parameters`] + [`vae_decoder_parameters`]).
pub fn vae_parameters(c: &VaeConfig) -> u64 {
    vae_encoder_parameters(c).saturating_add(vae_decoder_parameters(c))
}

// ---------------------------------------------------------------------------------------------
// T5

/// Parameters of `T5EncoderModel`: the token embedding (`shared`, tied to `encoder.embed_tokens`,
/// counted once), the blocks (attention, relative attention bias in block 0 only, gated or plain
/// feed-forward, two RMS norms) and `final_layer_norm`. No biases anywhere.
pub fn t5_encoder_parameters(c: &T5Config) -> u64 {
    let d = n(c.d_model);
    let inner = mul(n(c.num_heads), n(c.d_kv));
    let ff = n(c.d_ff);
    let gated = c
        .activation()
        .map(|(gated, _)| gated)
        .unwrap_or_else(|_| c.feed_forward_proj.starts_with("gated-"));
    let attention = mul(4, mul(d, inner));
    let dense = mul(if gated { 3 } else { 2 }, mul(d, ff));
    let block = sum([attention, d, dense, d]);
    let relative_bias = if c.num_layers > 0 {
        mul(n(c.relative_attention_num_buckets), n(c.num_heads))
    } else {
        0
    };
    sum([
        mul(n(c.vocab_size), d),
        mul(n(c.num_layers), block),
        relative_bias,
        d,
    ])
}
