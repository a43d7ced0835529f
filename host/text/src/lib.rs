//! Text conditioning for CogVideoX: the T5 tokenizer and the T5 v1.1 encoder.
//!
//! * [`T5Tokenizer`]: reads a diffusers `tokenizer/` folder (`tokenizer.json` or `spiece.model`)
//!   and gives transformers' `T5Tokenizer` ids.
//! * [`T5EncoderModel`]: transformers' model of that name, loaded from a `text_encoder/` folder with the
//!   checkpoint's key names.
//! * [`encode_prompts`] / [`PromptEncoder`]: the CogVideoX pipeline's `_get_t5_prompt_embeds`.
//! * [`run_case`]: the `text_encoder` parity component.

pub mod spm;
pub mod t5;
pub mod tokenizer;

pub use t5::{T5Config, T5EncoderModel};
pub use tokenizer::{T5Tokenizer, TokenizerConfig, TokenizerSource};

use burn::tensor::{backend::Backend, Tensor};
use cogvx_model_core::case::{Case, HostTensor};
use cogvx_model_core::ModelBackend;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `max_sequence_length` of the CogVideoX pipelines (and `max_text_seq_length` of the transformer).
pub const COGVIDEOX_MAX_SEQUENCE_LENGTH: usize = 226;

/// Errors of the text crate.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tokenizer file is malformed or not a T5 tokenizer.
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// Bad arguments (e.g. `max_length` 0, ids out of the vocabulary).
    #[error("{0}")]
    InvalidInput(String),
    /// Loading the encoder's config or weights failed.
    #[error(transparent)]
    Load(#[from] cogvx_model_core::LoadError),
}

/// The CogVideoX pipeline's `_get_t5_prompt_embeds`: tokenizes `prompts` with
/// `padding="max_length"`, `max_length=max_sequence_length`, truncation and `</s>`, runs the
/// encoder without an attention mask, and repeats each prompt's embedding
/// `num_videos_per_prompt` times (consecutively). Returns `[len(prompts) * num_videos_per_prompt,
/// max_sequence_length, d_model]`.
pub fn encode_prompts<B: ModelBackend, S: AsRef<str>>(
    tokenizer: &T5Tokenizer,
    encoder: &T5EncoderModel<B>,
    prompts: &[S],
    max_sequence_length: usize,
    num_videos_per_prompt: usize,
    device: &B::Device,
) -> Result<Tensor<B, 3>, TextError> {
    if num_videos_per_prompt == 0 {
        return Err(TextError::InvalidInput(
            "num_videos_per_prompt must be at least 1".into(),
        ));
    }
    let ids = tokenizer.encode_batch(prompts, max_sequence_length)?;
    let embeds = encoder.forward_ids(&ids, device)?;
    if num_videos_per_prompt == 1 {
        return Ok(embeds);
    }
    let [n, l, d] = embeds.dims();
    Ok(embeds
        .unsqueeze_dim::<4>(1)
        .repeat_dim(1, num_videos_per_prompt)
        .reshape([n * num_videos_per_prompt, l, d]))
}

/// A tokenizer and text encoder loaded together from a diffusers model folder.
#[derive(Debug)]
pub struct PromptEncoder<B: Backend> {
    pub tokenizer: T5Tokenizer,
    pub encoder: T5EncoderModel<B>,
}

impl<B: Backend> PromptEncoder<B> {
    /// Loads `<model_dir>/tokenizer` and `<model_dir>/text_encoder`.
    pub fn load(model_dir: impl AsRef<Path>, device: &B::Device) -> Result<Self, TextError> {
        Self::load_in(model_dir, None, device)
    }

    /// [`PromptEncoder::load`] with the encoder's weights kept in `dtype` ([`T5EncoderModel::load_in`]).
    pub fn load_in(
        model_dir: impl AsRef<Path>,
        dtype: Option<burn::tensor::FloatDType>,
        device: &B::Device,
    ) -> Result<Self, TextError> {
        let dir = model_dir.as_ref();
        Ok(PromptEncoder {
            tokenizer: T5Tokenizer::from_dir(dir.join("tokenizer"))?,
            encoder: T5EncoderModel::load_in(dir.join("text_encoder"), dtype, device)?,
        })
    }
}

impl<B: ModelBackend> PromptEncoder<B> {
    /// [`encode_prompts`] with this pair.
    pub fn encode<S: AsRef<str>>(
        &self,
        prompts: &[S],
        max_sequence_length: usize,
        num_videos_per_prompt: usize,
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, TextError> {
        encode_prompts(
            &self.tokenizer,
            &self.encoder,
            prompts,
            max_sequence_length,
            num_videos_per_prompt,
            device,
        )
    }
}

/// Runs a parity case of this crate's component, `text_encoder`.
///
/// When the case has `params.prompts`, they are tokenized with the model folder's tokenizer
/// (`max_length` from `params.max_length`, else the width of `in.input_ids`) and those ids feed
/// the encoder; otherwise `in.input_ids` do. Returns `last_hidden_state` (compare with
/// `out.last_hidden_state`) and `input_ids`, the ids used (compare exactly with `in.input_ids`).
pub fn run_case<B: ModelBackend>(
    case: &Case,
    device: &B::Device,
) -> Result<BTreeMap<String, HostTensor>, TextError> {
    if case.component != "text_encoder" {
        return Err(TextError::InvalidInput(format!(
            "case {}: component {:?} is not run by cogvx-text (it runs `text_encoder`)",
            case.name, case.component
        )));
    }
    let given = case.input("input_ids")?;
    let [n, l] = given.shape[..] else {
        return Err(TextError::InvalidInput(format!(
            "case {}: `in.input_ids` has shape {:?}, expected [N, L]",
            case.name, given.shape
        )));
    };
    let ids: Vec<Vec<u32>> = match case.params.get("prompts").and_then(|p| p.as_array()) {
        Some(prompts) => {
            let prompts: Vec<&str> = prompts
                .iter()
                .map(|p| {
                    p.as_str().ok_or_else(|| {
                        TextError::InvalidInput(format!(
                            "case {}: `params.prompts` must be strings",
                            case.name
                        ))
                    })
                })
                .collect::<Result<_, _>>()?;
            let max_length = case
                .params
                .get("max_length")
                .and_then(|m| m.as_u64())
                .map_or(l, |m| m as usize);
            T5Tokenizer::from_dir(case.model_dir.join("tokenizer"))?
                .encode_batch(&prompts, max_length)?
        }
        None => {
            let flat = given.to_i64();
            let mut rows = Vec::with_capacity(n);
            for r in 0..n {
                let row = flat[r * l..(r + 1) * l]
                    .iter()
                    .map(|&x| {
                        u32::try_from(x).map_err(|_| {
                            TextError::InvalidInput(format!(
                                "case {}: negative or huge token id {x}",
                                case.name
                            ))
                        })
                    })
                    .collect::<Result<Vec<u32>, _>>()?;
                rows.push(row);
            }
            rows
        }
    };
    let encoder = T5EncoderModel::<B>::load(case.model_dir.join("text_encoder"), device)?;
    let hidden = encoder.forward_ids(&ids, device)?;
    let (rows, width) = (ids.len(), ids.first().map_or(0, Vec::len));
    let mut out = BTreeMap::new();
    out.insert(
        "input_ids".to_string(),
        HostTensor::i64(
            vec![rows, width],
            ids.into_iter().flatten().map(i64::from).collect(),
        ),
    );
    out.insert(
        "last_hidden_state".to_string(),
        HostTensor::from_tensor(hidden),
    );
    Ok(out)
}
