//! # cogvx-cache
//!
//! The latent / prompt cache behind `cogvx prepare` (and `train`, which prepares when stale).
//!
//! For each dataset sample, [`prepare`] rewrites the caption through the chain's prompt
//! rewriters, plans and decodes the clip through its video transforms, VAE-encodes it the way
//! the official CogVideoX finetune caches videos (one posterior sample `mean + std * noise`,
//! seeded per sample, times `scaling_factor`, with the VAE's tiling and slicing enabled) and
//! T5-encodes the caption (`max_sequence_length`, 226 for CogVideoX), storing:
//!
//! ```text
//! <cache>/index.json                   the samples of the last prepare -> entry keys
//! <cache>/latents/<key>.safetensors    `latent` [C, F, h, w] (scaled), I2V: `image` [3, H, W]
//! <cache>/prompts/<key>.safetensors    `prompt_embedding` [L, D]
//! ```
//!
//! Keys are content hashes ([`keys`]): editing a video, an image, a caption, a plugin's
//! params or version, the model, the resolution or the seed changes only the keys that depend
//! on it, so exactly those entries are recomputed. Every file is written atomically (temporary
//! file, fsync, rename) and carries its key and a checksum of its tensors, so a crash mid-write,
//! a truncated or corrupt file is detected and recomputed, never read as valid.
//!
//! **I2V.** The official I2V trainer caches the conditioning *image* (pixels in [-1, 1],
//! `[C, H, W]`), not its latent: at train time it adds noise in pixel space
//! (`sigma = exp(N(-3, 0.5))`), VAE-encodes the noisy image, samples and scales the latent.
//! A latent cached before that noise would change the math, so the cache stores the
//! preprocessed image (from `images.txt`, through the clip's crop scaled to the image and
//! resized to the frame size, or else the clip's first trained frame) and the trainer
//! (`cogvx_trainer::image_latents`) does the train-time part.

pub mod keys;
mod plan;
mod prepare;
mod read;
pub mod store;

use std::path::{Path, PathBuf};

use cogvx_data::Problem;

pub use keys::{ModelIdentity, PluginId};
pub use plan::{plan, Plan, PlannedSample, PrepareOptions};
pub use prepare::{
    encode_latent, frames_to_video, prepare, prepare_on, prompt_embeddings, Summary,
};
pub use read::{read_index, Cache, Entry};
pub use store::HostTensor;

/// Index file name.
pub const INDEX: &str = "index.json";
/// Index format tag.
pub const INDEX_FORMAT: &str = "cogvx-cache-index/1";

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file could not be read or written.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An entry or index file is missing, truncated, corrupt or of the wrong shape.
    #[error("{path}: {message}", path = .path.display())]
    Entry { path: PathBuf, message: String },
    /// The dataset has problems (each with its file and line); nothing was prepared.
    #[error("the dataset has problems:\n{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Dataset(Vec<Problem>),
    /// Bad arguments (names what to change).
    #[error("{0}")]
    Input(String),
    /// Loading or running the VAE failed.
    #[error(transparent)]
    Vae(#[from] cogvx_vae::VaeError),
    /// Loading or running the text encoder failed.
    #[error(transparent)]
    Text(#[from] cogvx_text::TextError),
}

/// One sample as the cache plans it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IndexSample {
    /// `file:line` the sample came from (e.g. `videos.txt:3`).
    pub origin: String,
    /// The clip path, relative to the dataset root.
    pub video: String,
    /// The final caption (after the prompt rewriters).
    pub caption: String,
    /// The per-sample seed (crop randomness and the posterior sample).
    pub seed: u64,
    /// Key of `latents/<key>.safetensors`.
    pub latent: String,
    /// Key of `prompts/<key>.safetensors`.
    pub prompt: String,
    /// Whether the latent entry holds an `image` tensor (I2V).
    pub image: bool,
    /// `[frames, height, width]` of the sample's bucket (`[data] buckets`); absent: the
    /// index's resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<[u32; 3]>,
}

/// `index.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Index {
    pub format: String,
    pub model: ModelIdentity,
    pub transforms: Vec<PluginId>,
    /// `[frames, height, width]`; with buckets, the largest (validation's default size).
    pub resolution: [u32; 3],
    /// `[data] buckets`, `[frames, height, width]` each (empty: one resolution).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buckets: Vec<[u32; 3]>,
    pub seed: u64,
    pub max_sequence_length: usize,
    pub i2v: bool,
    pub samples: Vec<IndexSample>,
}

impl Index {
    /// `[frames, height, width]` of a sample: its bucket, else the index's resolution.
    pub fn resolution_of(&self, sample: &IndexSample) -> [u32; 3] {
        sample.resolution.unwrap_or(self.resolution)
    }
}

pub(crate) fn latent_path(cache: &Path, key: &str) -> PathBuf {
    cache.join("latents").join(format!("{key}.safetensors"))
}

pub(crate) fn prompt_path(cache: &Path, key: &str) -> PathBuf {
    cache.join("prompts").join(format!("{key}.safetensors"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{plan::*, read::*};
    use cogvx_plugin_api::Resolution;

    #[test]
    fn entries_are_validated_and_named_in_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.safetensors");
        let t = HostTensor::new(vec![2, 3], (0..6).map(|v| v as f32).collect());
        store::write_entry(&p, "k1", &[("prompt_embedding", &t)]).unwrap();
        assert_eq!(validate_prompt(&p, "k1").unwrap(), t);
        // Wrong key (a file moved or copied under another name).
        let e = validate_prompt(&p, "k2").unwrap_err().to_string();
        assert!(
            e.contains("x.safetensors") && e.contains("does not match"),
            "{e}"
        );
        // Wrong rank.
        let bad = HostTensor::new(vec![6], t.data.clone());
        store::write_entry(&p, "k1", &[("prompt_embedding", &bad)]).unwrap();
        assert!(validate_prompt(&p, "k1")
            .unwrap_err()
            .to_string()
            .contains("expected [L, D]"));
        // A latent entry without its I2V image.
        let l = HostTensor::new(vec![1, 1, 1, 1], vec![0.5]);
        store::write_entry(&p, "k3", &[("latent", &l)]).unwrap();
        assert!(validate_latent(&p, "k3", false).is_ok());
        assert!(validate_latent(&p, "k3", true)
            .unwrap_err()
            .to_string()
            .contains("no tensor `image`"));
        // Not a safetensors file at all; a missing file.
        std::fs::write(&p, b"garbage").unwrap();
        assert!(validate_latent(&p, "k3", false)
            .unwrap_err()
            .to_string()
            .contains("not a valid safetensors file"));
        assert!(validate_latent(&d.path().join("nope"), "k", false).is_err());
    }

    #[test]
    fn resolutions_are_checked() {
        assert!(check_resolution(Resolution {
            frames: 9,
            height: 64,
            width: 96
        })
        .is_ok());
        for r in [(10, 64, 96), (9, 60, 96), (9, 64, 0), (0, 64, 96)] {
            let e = check_resolution(Resolution {
                frames: r.0,
                height: r.1,
                width: r.2,
            })
            .unwrap_err();
            assert!(e.to_string().contains("8N+1"), "{e}");
        }
    }
}
