//! Activation memory, counted op by op from the shapes.
//!
//! The training counts follow what burn's autodiff keeps for the backward of each op of
//! `CogVideoXBlock::forward`, in units of `[tokens, inner_dim]` ("LD") and `[tokens, 4 x
//! inner_dim]` ("LF") float32 tensors. burn keeps an operand only when the other one's gradient
//! needs it: a frozen weight's matmul keeps no activation (its input is needed for the weight's
//! gradient alone), a product with a constant (the AdaLN scale and gates come from the frozen
//! timestep embedding in LoRA training, the RoPE tables) keeps only the constant. So what a block
//! keeps depends on what is trained: LoRA keeps the inputs of the layers it targets, SFT the
//! inputs of every layer and of every affine norm and gate.
//! FlashAttention keeps q, k, v, the output and the log-sum-exp; the feed-forward, one operation
//! when its layers carry no LoRA (`cogvx_model_core::feed_forward`), keeps its input and its
//! pre-activation (only its input with `recompute_feed_forward`, recomputing the pre-activation
//! chunk by chunk in the backward), never its hidden layer.

use cogvx_model_core::adapter::matches_target;
use cogvx_model_core::attention::flash::{MAX_BLOCK_K, TILE_ELEMENTS};
use cogvx_model_core::feed_forward::chunk_rows;
use cogvx_text::T5Config;
use cogvx_transformer::TransformerConfig;
use cogvx_vae::VaeConfig;

use crate::{ActivationPolicy, Checkpointing, DeviceKind, Shape, Tokens, Trainable, F32};

/// When a block keeps a tensor for its backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// Always (the gradient flows through it to a trained layer before it).
    Always,
    /// When one of these block layers is trained (LoRA target, or every layer in SFT).
    Trained(&'static [&'static str]),
    /// In SFT only (the inputs of trained norms, modulations and gates).
    Sft,
    /// When the feed-forward runs as one operation: none of its layers carries a LoRA.
    FfFused,
    /// When the one-operation feed-forward keeps its pre-activation (no
    /// `recompute_feed_forward`).
    FfPreActivation,
    /// When one of these feed-forward layers carries a LoRA (the feed-forward then runs layer by
    /// layer, its hidden layer kept whole).
    FfLora(&'static [&'static str]),
}

/// The dtype a kept tensor has under mixed precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The compute dtype (f32, or bf16/f16 with `mixed_precision`).
    Compute,
    /// Always f32: the LayerNorm statistics, computed in f32 as autocast does.
    F32,
}

/// What one `CogVideoXBlock` keeps for its backward: `(what, LD tensors, LF tensors, when, dtype)`.
pub const BLOCK_SAVED: [(&str, u64, u64, Kept, Kind); 13] = [
    (
        "norm1, norm2: the LayerNorm's centred input",
        2,
        0,
        Kept::Always,
        Kind::F32,
    ),
    (
        "norm_q, norm_k: the LayerNorm's centred input",
        2,
        0,
        Kept::Always,
        Kind::F32,
    ),
    (
        "attention: q, k, v and the output (FlashAttention keeps no scores)",
        4,
        0,
        Kept::Always,
        Kind::Compute,
    ),
    (
        "ff input, joined: what the one-operation feed-forward keeps",
        1,
        0,
        Kept::FfFused,
        Kind::Compute,
    ),
    (
        "ff.net.0.proj output, kept by the one-operation feed-forward (unless recomputed)",
        0,
        1,
        Kept::FfPreActivation,
        Kind::Compute,
    ),
    (
        "ff.net.0.proj output (the GELU's input)",
        0,
        1,
        Kept::FfLora(FF_LAYERS),
        Kind::Compute,
    ),
    (
        "attn1 input, text and video joined (to_q, to_k, to_v)",
        1,
        0,
        Kept::Trained(&["attn1.to_q", "attn1.to_k", "attn1.to_v"]),
        Kind::Compute,
    ),
    (
        "attention output as [L, D] (to_out.0)",
        1,
        0,
        Kept::Trained(&["attn1.to_out.0"]),
        Kind::Compute,
    ),
    (
        "ff input, joined (ff.net.0.proj's LoRA)",
        1,
        0,
        Kept::FfLora(&["ff.net.0.proj"]),
        Kind::Compute,
    ),
    (
        "GELU output (ff.net.2's LoRA)",
        0,
        1,
        Kept::FfLora(&["ff.net.2"]),
        Kind::Compute,
    ),
    (
        "norm1, norm2, norm_q, norm_k: normalised input of the affine weight",
        4,
        0,
        Kept::Sft,
        Kind::F32,
    ),
    (
        "norm1, norm2: affine output, for the AdaLN scale's gradient",
        2,
        0,
        Kept::Sft,
        Kind::Compute,
    ),
    (
        "attention and ff outputs, for the gates' gradients",
        2,
        0,
        Kept::Sft,
        Kind::Compute,
    ),
];

/// The feed-forward's two layers.
const FF_LAYERS: &[&str] = &["ff.net.0.proj", "ff.net.2"];

/// Whether block 0's `layer` carries a LoRA (never in SFT).
fn has_lora(trainable: &Trainable, layer: &str) -> bool {
    match trainable {
        Trainable::Full => false,
        Trainable::Lora { targets, .. } => {
            matches_target(&format!("transformer_blocks.0.{layer}"), targets)
        }
    }
}

/// Whether the feed-forward runs as one operation (no LoRA on its layers): it then keeps only
/// its input and never holds its hidden layer whole.
pub fn ff_fused(trainable: &Trainable) -> bool {
    !FF_LAYERS.iter().any(|l| has_lora(trainable, l))
}

/// Elements of the fused feed-forward's hidden-layer chunk at `rows` rows.
fn ff_chunk_elements(c: &TransformerConfig, rows: u64) -> u64 {
    let f = 4 * c.inner_dim();
    rows.min(chunk_rows(f) as u64) * f as u64
}

/// What the layers after the last block keep: the centred inputs of `norm_final` and
/// `norm_out` (LoRA; SFT also their affine and modulation inputs and `proj_out`'s input), in LD.
pub fn output_saved_ld(trainable: &Trainable) -> u64 {
    match trainable {
        Trainable::Lora { .. } => 2,
        Trainable::Full => 6,
    }
}

/// Every `nn.Linear` of the transformer with its diffusers module path and `(in, out)` features,
/// in module order (as `cogvx_train::linear_layers_mut` lists them).
pub fn linear_layers(c: &TransformerConfig) -> Vec<(String, usize, usize)> {
    let d = c.inner_dim();
    let e = c.time_embed_dim;
    let p = c.patch_size;
    let mut out = Vec::new();
    if let Some(pt) = c.patch_size_t {
        out.push((
            "patch_embed.proj".to_string(),
            c.in_channels * p * p * pt,
            d,
        ));
    }
    out.push(("patch_embed.text_proj".into(), c.text_embed_dim, d));
    out.push(("time_embedding.linear_1".into(), d, e));
    out.push(("time_embedding.linear_2".into(), e, e));
    if let Some(o) = c.ofs_embed_dim {
        out.push(("ofs_embedding.linear_1".into(), o, o));
        out.push(("ofs_embedding.linear_2".into(), o, o));
    }
    for i in 0..c.num_layers {
        let b = format!("transformer_blocks.{i}");
        out.push((format!("{b}.norm1.linear"), e, 6 * d));
        for m in ["to_q", "to_k", "to_v", "to_out.0"] {
            out.push((format!("{b}.attn1.{m}"), d, d));
        }
        out.push((format!("{b}.norm2.linear"), e, 6 * d));
        out.push((format!("{b}.ff.net.0.proj"), d, 4 * d));
        out.push((format!("{b}.ff.net.2"), 4 * d, d));
    }
    out.push(("norm_out.linear".into(), e, 2 * d));
    out.push((
        "proj_out".into(),
        d,
        p * p * c.patch_size_t.unwrap_or(1) * c.out_channels(),
    ));
    out
}

/// LoRA parameters: `rank x (in + out)` for every linear layer matching `targets`.
pub fn lora_parameters(c: &TransformerConfig, rank: usize, targets: &[String]) -> u64 {
    linear_layers(c)
        .iter()
        .filter(|(name, _, _)| matches_target(name, targets))
        .map(|(_, i, o)| (rank * (i + o)) as u64)
        .sum()
}

/// LoRA layers of block 0 that match `targets` (their `x A` products are kept per token).
fn lora_layers_per_block(c: &TransformerConfig, targets: &[String]) -> u64 {
    linear_layers(c)
        .iter()
        .filter(|(name, _, _)| {
            name.starts_with("transformer_blocks.0.") && matches_target(name, targets)
        })
        .count() as u64
}

/// Elements of one FlashAttention score tile for `batch_heads` rows of `len` queries and keys
/// (the default tiling of `cogvx_model_core::attention`).
pub fn attention_tile_elements(batch_heads: usize, len: usize) -> u64 {
    let k = len.clamp(1, MAX_BLOCK_K);
    let rows = (TILE_ELEMENTS / (batch_heads.max(1) * k)).clamp(1, len.max(1));
    (batch_heads * rows * k) as u64
}

/// Bytes of the score-sized tiles alive at once in one attention call, in training (the
/// backward's) or not (the forward's): on the GPU 4 or 2 FlashAttention tiles of all heads
/// ([`attention_tile_elements`]); on the CPU the kernel's (`cogvx_kernels::attention`), one
/// head per thread at a time, on as many threads as the machine has: in the forward one
/// `Tiles::FORWARD` score tile, in the backward two `Tiles::BACKWARD` ones (probabilities and
/// their gradient), the larger of the two in training.
fn attention_tile_bytes(device: DeviceKind, batch_heads: usize, len: usize, training: bool) -> u64 {
    let elements = match device {
        DeviceKind::Cuda => {
            let per_call = if training { 4 } else { 2 };
            per_call * attention_tile_elements(batch_heads, len)
        }
        DeviceKind::Cpu => {
            use cogvx_kernels::attention::Tiles;
            let tile = |t: Tiles| (t.q.min(len) * t.k.min(len)) as u64;
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let per_thread = if training {
                tile(Tiles::FORWARD).max(2 * tile(Tiles::BACKWARD))
            } else {
                tile(Tiles::FORWARD)
            };
            threads.min(batch_heads.max(1)) as u64 * per_thread
        }
    };
    elements * F32
}

/// Whether the one-operation feed-forward runs as the CPU kernel (f32 on the CPU), which holds
/// one chunk-sized (`[chunk_rows, 4 x inner_dim]`, f32) scratch buffer in the forward and, in
/// the backward, the hidden gradient's and, when recomputed, the pre-activation's; otherwise
/// (the GPU, half precision on the CPU) it runs as composed chunks, which hold 3 such
/// temporaries in the forward and 6 in the backward.
fn ff_kernel(device: DeviceKind, act: u64) -> bool {
    device == DeviceKind::Cpu && act == F32
}

/// Training-step activation memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainingActivations {
    /// Kept for the backward at its peak, on the device.
    pub saved: u64,
    /// Block inputs kept in host memory ([`Checkpointing::Offloaded`]).
    pub offloaded: u64,
    /// Gradients alive at the larger of the feed-forward's and the attention's backward peaks,
    /// beyond [`TrainingActivations::attention`] (so that the two items add up to that peak).
    pub workspace: u64,
    /// FlashAttention tiles of the backward (scores, probabilities and their gradients).
    pub attention: u64,
    /// Latents, noise, prediction, target and prompt embeddings.
    pub inputs: u64,
}

/// One block's kept activations, in bytes, for `rows = batch x tokens`, with activations of
/// `act` bytes per element (4, or 2 in mixed precision; the norm statistics stay f32);
/// `recompute_ff` as `[train] recompute_feed_forward`.
pub fn block_saved_bytes(
    c: &TransformerConfig,
    rows: u64,
    trainable: &Trainable,
    recompute_ff: bool,
    act: u64,
) -> u64 {
    let d = c.inner_dim() as u64;
    let f = 4 * d;
    let trained = |layer: &str| *trainable == Trainable::Full || has_lora(trainable, layer);
    let per_row: u64 = BLOCK_SAVED
        .iter()
        .filter(|(_, _, _, kept, _)| match kept {
            Kept::Always => true,
            Kept::Trained(layers) => layers.iter().any(|l| trained(l)),
            Kept::Sft => *trainable == Trainable::Full,
            Kept::FfFused => ff_fused(trainable),
            Kept::FfPreActivation => ff_fused(trainable) && !recompute_ff,
            Kept::FfLora(layers) => layers.iter().any(|l| has_lora(trainable, l)),
        })
        .map(|(_, ld, lf, _, kind)| (ld * d + lf * f) * if *kind == Kind::F32 { F32 } else { act })
        .sum();
    let lse = c.num_attention_heads as u64 * rows * F32;
    // LoRA: each targeted layer keeps `x A` ([rows, rank]) for B's gradient.
    let lora = match trainable {
        Trainable::Lora { rank, targets } => {
            lora_layers_per_block(c, targets) * *rank as u64 * rows * act
        }
        Trainable::Full => 0,
    };
    rows * per_row + lse + lora
}

/// The activations of one training step at `tokens` x `batch`, activations of `act` bytes per
/// element (4, or 2 in mixed precision).
pub fn training(
    c: &TransformerConfig,
    tokens: Tokens,
    batch: usize,
    trainable: &Trainable,
    policy: ActivationPolicy,
    act: u64,
    device: DeviceKind,
) -> TrainingActivations {
    let rows = (batch * tokens.total) as u64;
    let d = c.inner_dim() as u64;
    let f = 4 * d;
    let block = block_saved_bytes(c, rows, trainable, policy.recompute_feed_forward, act);
    let checkpointing = policy.checkpointing;
    // norm_final and norm_out keep f32 statistics.
    let around = rows * d * output_saved_ld(trainable) * F32;
    let blocks = c.num_layers as u64;
    // forward_taped keeps each block's input (video and text rows), then recomputes one block
    // at a time in the backward; the segmented backward also holds the last block's output (the
    // head's leaf) and the gradient of the recomputed block's output. Offloaded, the inputs
    // wait in host memory and one is on the device while its block is recomputed.
    let inputs_kept = blocks * rows * d * act;
    let segments = 2 * rows * d * act;
    let (saved, offloaded) = match checkpointing {
        Checkpointing::Off => (blocks * block + around, 0),
        Checkpointing::Blocks => (inputs_kept + segments + around + block, 0),
        Checkpointing::Offloaded => (rows * d * act + segments + around + block, inputs_kept),
    };
    // Feed-forward backward: the gradients of the block's input, output and residual stream
    // (LD each) and, one operation, chunk-sized buffers ([`ff_kernel`]: on the CPU the
    // hidden gradient and the pre-activation when recomputed; composed on the GPU also the
    // GELU's output and its f32 temporaries), or, layer by layer, the gradients of the GELU
    // output and input whole (LF each). The attention
    // backward needs dq, dk, dv, dout and the residual (6 LD). In half precision the attention
    // computes in f32: q, k, v, the output and its gradient upcast, and dq, dk, dv in f32 (8 LD of f32).
    let ff = if ff_fused(trainable) {
        let chunks = if ff_kernel(device, act) {
            1 + u64::from(policy.recompute_feed_forward)
        } else {
            6
        };
        rows * 3 * d * act + chunks * ff_chunk_elements(c, rows) * F32
    } else {
        rows * (2 * f + 3 * d) * act
    };
    let attention = if act < F32 {
        rows * 8 * d * F32
    } else {
        rows * 6 * d * F32
    };
    let tiles = attention_tile_bytes(device, batch * c.num_attention_heads, tokens.total, true);
    // The two peaks of a block's backward: the feed-forward's (first), and the attention's with
    // its tiles, by which time the block no longer keeps what the feed-forward and norm2 kept
    // (the ff input and pre-activation, or the hidden layer, and norm2's centred input). The
    // workspace item is what the larger one adds beside the tiles (counted in their own item).
    let ff_kept = match (ff_fused(trainable), policy.recompute_feed_forward) {
        (true, true) => rows * d * act,
        (true, false) => rows * (d + f) * act,
        (false, _) => rows * f * act,
    };
    let released = ff_kept + rows * d * F32;
    let workspace = ff
        .saturating_sub(tiles)
        .max(attention.saturating_sub(released));
    let latent = (batch
        * tokens.video
        * c.patch_size
        * c.patch_size
        * c.patch_size_t.unwrap_or(1)
        * c.out_channels()) as u64;
    let inputs = 5 * latent + (batch * tokens.text * c.text_embed_dim) as u64;
    TrainingActivations {
        saved,
        offloaded,
        workspace,
        attention: tiles,
        inputs: inputs * F32,
    }
}

/// Peak activation bytes of one transformer forward without autodiff (sampling) at `tokens` x
/// `batch` on `device`: the feed-forward's input, hidden and output, or the attention's q, k,
/// v, output and tiles, whichever is larger (the hidden layer whole when a LoRA sits on a
/// feed-forward layer, else its chunks). Activations are `act` bytes per element (the
/// attention's tiles are f32).
pub fn inference_bytes(
    c: &TransformerConfig,
    tokens: Tokens,
    batch: usize,
    trainable: &Trainable,
    act: u64,
    device: DeviceKind,
) -> u64 {
    let rows = (batch * tokens.total) as u64;
    let d = c.inner_dim() as u64;
    let ff = if ff_fused(trainable) {
        let chunks = if ff_kernel(device, act) { 1 } else { 3 };
        rows * 3 * d * act + chunks * ff_chunk_elements(c, rows) * F32
    } else {
        rows * (3 * d + 2 * 4 * d) * act
    };
    let attention = rows * 10 * d * F32
        + attention_tile_bytes(device, batch * c.num_attention_heads, tokens.total, false);
    ff.max(attention)
}

/// Tensors of the largest VAE level alive at once (block input, GroupNorm temporaries, activation,
/// causal-padded conv input, conv output).
pub const VAE_ALIVE: u64 = 6;

/// Peak activation bytes of the VAE encode in `prepare`: tiles of diffusers' default size (half
/// the VAE's sample size), frame batches of 8 (the first one 9), the first level's channels at
/// the tile's full resolution.
pub fn vae_encode_bytes(c: &VaeConfig, shape: Shape) -> u64 {
    let h = shape.height.min(c.sample_height / 2).max(1);
    let w = shape.width.min(c.sample_width / 2).max(1);
    let frames = shape.frames.min(9);
    let ch = c.block_out_channels.first().copied().unwrap_or(128);
    VAE_ALIVE * (ch * frames * h * w) as u64 * F32
}

/// Peak activation bytes of validation's VAE decode, tiled and sliced as the official
/// finetune's (`enable_tiling`, `enable_slicing`): tiles of half the VAE's sample size, latent
/// frames in batches of 2 (8 video frames), the last level's channels at the tile's full
/// resolution; plus the decoded tiles kept until they are blended (their overlap, 1/6 of the
/// height and 1/5 of the width, makes them 1.5x the video's frames).
pub fn vae_decode_bytes(c: &VaeConfig, shape: Shape) -> u64 {
    let h = shape.height.min(c.sample_height / 2).max(1);
    let w = shape.width.min(c.sample_width / 2).max(1);
    let frames = shape.frames.min(2 * c.temporal_compression_ratio as usize);
    let ch = c.block_out_channels.first().copied().unwrap_or(128);
    let tiles = if h < shape.height || w < shape.width {
        3 * (shape.frames * shape.height * shape.width) as u64 * 3 / 2
    } else {
        0
    };
    (VAE_ALIVE * (ch * frames * h * w) as u64 + tiles) * F32
}

/// Peak activation bytes of the T5 encoder at `len` tokens: the gated feed-forward's hidden
/// states and one layer's attention scores.
pub fn t5_bytes(c: &T5Config, len: usize) -> u64 {
    let l = len as u64;
    (l * (3 * c.d_model as u64 + 3 * c.d_ff as u64) + 2 * (c.num_heads as u64) * l * l) * F32
}
