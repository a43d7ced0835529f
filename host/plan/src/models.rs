//! The model configs a plan is computed from: a diffusers folder's `config.json` files, or the
//! released checkpoints' own, shipped in `configs/models/<name>/` and built into the binary.

use std::path::Path;

use cogvx_text::T5Config;
use cogvx_transformer::TransformerConfig;
use cogvx_vae::VaeConfig;

use crate::PlanError;

/// The three configs that size a CogVideoX model: transformer, VAE and T5 encoder.
#[derive(Clone, Debug)]
pub struct ModelConfigs {
    /// Where the configs came from (a folder, or `released:<name>`), for messages.
    pub source: String,
    pub transformer: TransformerConfig,
    pub vae: VaeConfig,
    pub text_encoder: T5Config,
}

/// A released checkpoint's `config.json` files (transformer, VAE, text encoder).
struct Released {
    name: &'static str,
    transformer: &'static str,
    vae: &'static str,
    text_encoder: &'static str,
}

macro_rules! released {
    ($name:literal) => {
        Released {
            name: $name,
            transformer: include_str!(concat!(
                "../../../configs/models/",
                $name,
                "/transformer/config.json"
            )),
            vae: include_str!(concat!(
                "../../../configs/models/",
                $name,
                "/vae/config.json"
            )),
            text_encoder: include_str!(concat!(
                "../../../configs/models/",
                $name,
                "/text_encoder/config.json"
            )),
        }
    };
}

/// The released checkpoints, by the lower-case name of their Hugging Face repository
/// (`THUDM/CogVideoX-2b` is `cogvideox-2b`).
const RELEASED: [Released; 5] = [
    released!("cogvideox-2b"),
    released!("cogvideox-5b"),
    released!("cogvideox-5b-i2v"),
    released!("cogvideox1.5-5b"),
    released!("cogvideox1.5-5b-i2v"),
];

/// Names accepted by [`ModelConfigs::released`].
pub fn released_names() -> Vec<&'static str> {
    RELEASED.iter().map(|r| r.name).collect()
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, PlanError> {
    serde_json::from_str(text).map_err(|e| PlanError::Model(format!("{what}: {e}")))
}

impl ModelConfigs {
    /// The configs of a released checkpoint: `cogvideox-2b`, `cogvideox-5b`, `cogvideox-5b-i2v`,
    /// `cogvideox1.5-5b`, `cogvideox1.5-5b-i2v` (case-insensitive; a `THUDM/` prefix is accepted).
    pub fn released(name: &str) -> Result<Self, PlanError> {
        let key = name.trim().to_ascii_lowercase();
        let key = key.strip_prefix("thudm/").unwrap_or(&key);
        let r = RELEASED.iter().find(|r| r.name == key).ok_or_else(|| {
            PlanError::Model(format!(
                "unknown model `{name}` (known: {})",
                released_names().join(", ")
            ))
        })?;
        let source = format!("released:{}", r.name);
        Ok(ModelConfigs {
            transformer: parse(&format!("{source} transformer/config.json"), r.transformer)?,
            vae: parse(&format!("{source} vae/config.json"), r.vae)?,
            text_encoder: parse(
                &format!("{source} text_encoder/config.json"),
                r.text_encoder,
            )?,
            source,
        })
    }

    /// Reads `transformer/`, `vae/` and `text_encoder/config.json` of a diffusers folder.
    pub fn from_dir(dir: &Path) -> Result<Self, PlanError> {
        let read = |component: &str| -> Result<String, PlanError> {
            let path = dir.join(component).join("config.json");
            std::fs::read_to_string(&path)
                .map_err(|e| PlanError::Model(format!("{}: {e}", path.display())))
        };
        let path = |component: &str| {
            dir.join(component)
                .join("config.json")
                .display()
                .to_string()
        };
        Ok(ModelConfigs {
            transformer: parse(&path("transformer"), &read("transformer")?)?,
            vae: parse(&path("vae"), &read("vae")?)?,
            text_encoder: parse(&path("text_encoder"), &read("text_encoder")?)?,
            source: dir.display().to_string(),
        })
    }

    /// Whether the transformer takes image latents on its channels (I2V).
    pub fn is_i2v(&self) -> bool {
        self.transformer.in_channels == 2 * self.transformer.out_channels()
    }
}
