//! Content-hash cache keys.
//!
//! * latent key = sha256 of (video file bytes, I2V image file bytes if any, frame range, the
//!   video-transform chain: plugin names, versions and canonical params JSON in order, the VAE
//!   identity, the VAE options, the resolution, the base seed);
//! * prompt key = sha256 of (final rewritten caption, text-encoder identity, max length).
//!
//! Model identities hash the component's config files and its weight files' names and sizes
//! (not their bytes: multi-GB checkpoints are not re-read on every run).

use std::path::Path;

use cogvx_plugin_api::{FrameRange, Resolution};
use sha2::{Digest, Sha256};

use crate::store::hex;
use crate::CacheError;

/// One video-transform plugin as it takes part in a key: name, version and params JSON.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PluginId {
    pub name: String,
    pub version: String,
    /// Canonical JSON of the plugin's params (keys sorted, no whitespace); `null` if none.
    pub params: String,
}

impl PluginId {
    /// From a plugin's info and the params JSON it was configured with (any formatting;
    /// canonicalised so that key order and whitespace do not change the key).
    pub fn new(name: &str, version: &str, params_json: &str) -> Result<Self, CacheError> {
        let params = if params_json.trim().is_empty() {
            "null".to_string()
        } else {
            let v: serde_json::Value = serde_json::from_str(params_json).map_err(|e| {
                CacheError::Input(format!("params of plugin `{name}` are not valid JSON: {e}"))
            })?;
            canonical(&v)
        };
        Ok(PluginId {
            name: name.into(),
            version: version.into(),
            params,
        })
    }
}

/// A streaming sha256 with length-prefixed fields (no ambiguity between adjacent fields).
pub(crate) struct KeyHasher(Sha256);

impl KeyHasher {
    pub fn new(domain: &str) -> Self {
        let mut k = KeyHasher(Sha256::new());
        k.field(domain.as_bytes());
        k
    }
    pub fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }
    pub fn finish(self) -> String {
        hex(&self.0.finalize())
    }
}

/// sha256 (hex) of a file's bytes, streamed.
pub fn file_sha256(path: &Path) -> Result<String, CacheError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| CacheError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Identity of a model component folder: its `*.json` files' bytes, the names and sizes of
/// its weight files (`*.safetensors`, `*.bin`), plus every file of `extra` folders (e.g. the
/// tokenizer) by bytes.
pub fn component_identity(dir: &Path, extra: &[&Path]) -> Result<String, CacheError> {
    let mut k = KeyHasher::new("cogvx-cache/component/1");
    let list = |d: &Path| -> Result<Vec<std::path::PathBuf>, CacheError> {
        let rd = std::fs::read_dir(d).map_err(|source| CacheError::Io {
            path: d.to_path_buf(),
            source,
        })?;
        let mut v: Vec<_> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        Ok(v)
    };
    let files = list(dir)?;
    if !files
        .iter()
        .any(|p| p.file_name().is_some_and(|n| n == "config.json"))
    {
        return Err(CacheError::Input(format!(
            "{}: no config.json; expected a diffusers model component folder",
            dir.display()
        )));
    }
    for p in files {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".json") {
            let bytes = std::fs::read(&p).map_err(|source| CacheError::Io {
                path: p.clone(),
                source,
            })?;
            k.field(name.as_bytes()).field(&bytes);
        } else if name.ends_with(".safetensors") || name.ends_with(".bin") {
            let len = std::fs::metadata(&p)
                .map_err(|source| CacheError::Io {
                    path: p.clone(),
                    source,
                })?
                .len();
            k.field(name.as_bytes()).field(&len.to_le_bytes());
        }
    }
    for d in extra {
        for p in list(d)? {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            k.field(name.as_bytes()).field(file_sha256(&p)?.as_bytes());
        }
    }
    Ok(k.finish())
}

/// The identities of a model folder's VAE and text encoder (with its tokenizer).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelIdentity {
    pub vae: String,
    pub text: String,
}

impl ModelIdentity {
    /// Hashes `<model>/vae` and `<model>/text_encoder` + `<model>/tokenizer`.
    pub fn of(model_dir: &Path) -> Result<Self, CacheError> {
        Ok(ModelIdentity {
            vae: component_identity(&model_dir.join("vae"), &[])?,
            text: component_identity(
                &model_dir.join("text_encoder"),
                &[&model_dir.join("tokenizer")],
            )?,
        })
    }
}

/// Everything but the sample's own files that a latent depends on.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LatentContext<'a> {
    pub transforms: &'a [PluginId],
    pub vae: &'a str,
    /// Serialized VAE options (tiling/slicing).
    pub vae_options: &'a str,
    pub resolution: Resolution,
    pub seed: u64,
    pub i2v: bool,
}

/// The latent entry key of one sample.
pub fn latent_key(
    ctx: &LatentContext<'_>,
    video_sha: &str,
    image_sha: Option<&str>,
    range: Option<FrameRange>,
) -> String {
    let mut k = KeyHasher::new("cogvx-cache/latent/1");
    k.field(video_sha.as_bytes());
    k.field(image_sha.unwrap_or("-").as_bytes());
    k.field(format!("{:?}", range.map(|r| (r.start, r.end))).as_bytes());
    k.field(
        serde_json::to_string(ctx.transforms)
            .unwrap_or_default()
            .as_bytes(),
    );
    k.field(ctx.vae.as_bytes())
        .field(ctx.vae_options.as_bytes());
    let r = ctx.resolution;
    k.field(format!("{}x{}x{}", r.frames, r.height, r.width).as_bytes());
    k.field(&ctx.seed.to_le_bytes());
    k.field(&[ctx.i2v as u8]);
    k.finish()
}

/// The per-sample seed: from the base seed and the sample's content (video hash and frame
/// range), so it does not depend on the sample's position in the dataset.
pub fn sample_seed(base: u64, video_sha: &str, range: Option<FrameRange>) -> u64 {
    let mut k = KeyHasher::new("cogvx-cache/seed/1");
    k.field(&base.to_le_bytes()).field(video_sha.as_bytes());
    k.field(format!("{:?}", range.map(|r| (r.start, r.end))).as_bytes());
    let h = k.finish();
    u64::from_str_radix(&h[..16], 16).unwrap_or(0)
}

/// The prompt entry key: final caption, text-encoder identity, max length.
pub fn prompt_key(
    caption: &str,
    text_identity: &str,
    max_length: usize,
    text_dtype: Option<burn::tensor::FloatDType>,
) -> String {
    let mut k = KeyHasher::new("cogvx-cache/prompt/1");
    k.field(caption.as_bytes())
        .field(text_identity.as_bytes())
        .field(&(max_length as u64).to_le_bytes());
    // The encoder's dtype, when it is not f32 (f32 keys are those of caches written before the
    // dtype was a field): a bf16 embedding never stands in for an f32 one.
    if let Some(dtype) = text_dtype.filter(|d| *d != burn::tensor::FloatDType::F32) {
        k.field(format!("{dtype:?}").as_bytes());
    }
    k.finish()
}

/// JSON with object keys sorted at every level and no whitespace.
fn canonical(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&m[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_canonical_and_keys_separate_fields() {
        let a = PluginId::new(
            "crop_resize",
            "0.1.0",
            r#"{"b": 1, "a": {"y": [1, 2], "x": null}}"#,
        )
        .unwrap();
        let b = PluginId::new(
            "crop_resize",
            "0.1.0",
            r#"{"a":{"x":null,"y":[1,2]},"b":1}"#,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.params, r#"{"a":{"x":null,"y":[1,2]},"b":1}"#);
        assert_eq!(PluginId::new("p", "1", "  ").unwrap().params, "null");
        let err = PluginId::new("p", "1", "{oops").unwrap_err().to_string();
        assert!(
            err.contains("params of plugin `p` are not valid JSON"),
            "{err}"
        );
        // Length-prefixed fields: moving a byte across a boundary changes the key.
        assert_ne!(
            prompt_key("ab", "c", 226, None),
            prompt_key("a", "bc", 226, None)
        );
        assert_ne!(
            prompt_key("a", "t", 226, None),
            prompt_key("a", "t", 128, None)
        );
        let bf16 = Some(burn::tensor::FloatDType::BF16);
        assert_ne!(
            prompt_key("a", "t", 226, None),
            prompt_key("a", "t", 226, bf16)
        );
        assert_eq!(
            prompt_key("a", "t", 226, None),
            prompt_key("a", "t", 226, Some(burn::tensor::FloatDType::F32))
        );
        assert_ne!(sample_seed(1, "v", None), sample_seed(2, "v", None));
        let r = Some(FrameRange { start: 0, end: 9 });
        assert_ne!(sample_seed(1, "v", None), sample_seed(1, "v", r));
    }

    #[test]
    fn model_identity_follows_configs_and_weight_sizes() {
        let d = tempfile::tempdir().unwrap();
        let vae = d.path().join("vae");
        std::fs::create_dir_all(&vae).unwrap();
        std::fs::write(vae.join("config.json"), "{\"a\": 1}").unwrap();
        std::fs::write(vae.join("diffusion_pytorch_model.safetensors"), [0u8; 16]).unwrap();
        let a = component_identity(&vae, &[]).unwrap();
        std::fs::write(vae.join("diffusion_pytorch_model.safetensors"), [1u8; 16]).unwrap();
        assert_eq!(
            component_identity(&vae, &[]).unwrap(),
            a,
            "weights are identified by name and size"
        );
        std::fs::write(vae.join("diffusion_pytorch_model.safetensors"), [1u8; 17]).unwrap();
        let b = component_identity(&vae, &[]).unwrap();
        assert_ne!(b, a);
        std::fs::write(vae.join("config.json"), "{\"a\": 2}").unwrap();
        assert_ne!(component_identity(&vae, &[]).unwrap(), b);
        let err = component_identity(d.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("no config.json"), "{err}");
    }
}
