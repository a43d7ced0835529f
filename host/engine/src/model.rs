//! A diffusers CogVideoX model folder: `model_index.json` and the component folders
//! (`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), the way
//! `DiffusionPipeline.from_pretrained` reads them, and which CogVideoX variant it holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cogvx_scheduler::SchedulerKind;
use cogvx_transformer::TransformerConfig;
use serde_json::Value;

use crate::EngineError;

/// The five CogVideoX checkpoints' architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// THUDM/CogVideoX-2b: sincos positional embedding, no RoPE.
    CogVideoX2b,
    /// THUDM/CogVideoX-5b: 3D RoPE (linspace grid with the resize-crop region).
    CogVideoX5b,
    /// THUDM/CogVideoX-5b-I2V: RoPE, learned positional embedding, image latents on channels.
    CogVideoX5bI2v,
    /// THUDM/CogVideoX1.5-5B: `patch_size_t = 2`, RoPE with the `slice` grid.
    CogVideoX15_5b,
    /// THUDM/CogVideoX1.5-5B-I2V: as 1.5 plus image latents and the `ofs` embedding.
    CogVideoX15_5bI2v,
}

impl Variant {
    /// All variants.
    pub const ALL: [Variant; 5] = [
        Variant::CogVideoX2b,
        Variant::CogVideoX5b,
        Variant::CogVideoX5bI2v,
        Variant::CogVideoX15_5b,
        Variant::CogVideoX15_5bI2v,
    ];

    /// Short name: `2b`, `5b`, `5b-i2v`, `1.5-5b`, `1.5-5b-i2v`.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::CogVideoX2b => "2b",
            Variant::CogVideoX5b => "5b",
            Variant::CogVideoX5bI2v => "5b-i2v",
            Variant::CogVideoX15_5b => "1.5-5b",
            Variant::CogVideoX15_5bI2v => "1.5-5b-i2v",
        }
    }

    /// Whether the model is image-to-video (image latents concatenated on channels).
    pub fn is_i2v(self) -> bool {
        matches!(self, Variant::CogVideoX5bI2v | Variant::CogVideoX15_5bI2v)
    }

    /// Whether this is a CogVideoX 1.5 model (`patch_size_t`).
    pub fn is_v15(self) -> bool {
        matches!(self, Variant::CogVideoX15_5b | Variant::CogVideoX15_5bI2v)
    }

    /// Derives the variant from the transformer config: `use_rotary_positional_embeddings`,
    /// `patch_size_t`, `in_channels` vs `out_channels`, `use_learned_positional_embeddings`
    /// and `ofs_embed_dim`. A combination no CogVideoX checkpoint has is an error listing them.
    pub fn detect(c: &TransformerConfig) -> Result<Variant, String> {
        let out = c.out_channels();
        let i2v = if c.in_channels == out {
            Some(false)
        } else if c.in_channels == 2 * out {
            Some(true)
        } else {
            None
        };
        let variant = match (
            c.use_rotary_positional_embeddings,
            c.patch_size_t.is_some(),
            i2v,
            c.use_learned_positional_embeddings,
            c.ofs_embed_dim.is_some(),
        ) {
            (false, false, Some(false), false, false) => Some(Variant::CogVideoX2b),
            (true, false, Some(false), false, false) => Some(Variant::CogVideoX5b),
            (true, false, Some(true), true, false) => Some(Variant::CogVideoX5bI2v),
            (true, true, Some(false), false, false) => Some(Variant::CogVideoX15_5b),
            (true, true, Some(true), false, true) => Some(Variant::CogVideoX15_5bI2v),
            _ => None,
        };
        variant.ok_or_else(|| {
            format!(
                "unknown CogVideoX variant: use_rotary_positional_embeddings = {}, patch_size_t = {:?}, \
                 in_channels = {}, out_channels = {}, use_learned_positional_embeddings = {}, ofs_embed_dim = {:?}; \
                 known: 2b (no RoPE), 5b (RoPE), 5b-i2v (RoPE, learned positions, in = 2 x out), \
                 1.5-5b (RoPE, patch_size_t), 1.5-5b-i2v (RoPE, patch_size_t, in = 2 x out, ofs_embed_dim)",
                c.use_rotary_positional_embeddings,
                c.patch_size_t,
                c.in_channels,
                out,
                c.use_learned_positional_embeddings,
                c.ofs_embed_dim
            )
        })
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Pipeline classes of `model_index.json` we accept, and whether they are image-to-video.
pub const KNOWN_PIPELINES: [(&str, bool); 3] = [
    ("CogVideoXPipeline", false),
    ("CogVideoXVideoToVideoPipeline", false),
    ("CogVideoXImageToVideoPipeline", true),
];

/// Component classes we can load, per component folder.
pub const KNOWN_COMPONENTS: [(&str, &[&str]); 5] = [
    ("transformer", &["CogVideoXTransformer3DModel"]),
    ("vae", &["AutoencoderKLCogVideoX"]),
    ("text_encoder", &["T5EncoderModel"]),
    ("tokenizer", &["T5Tokenizer", "T5TokenizerFast"]),
    (
        "scheduler",
        &["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"],
    ),
];

/// `model_index.json`: the pipeline class and `(library, class)` per component.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelIndex {
    pub class_name: String,
    pub components: BTreeMap<String, (String, String)>,
}

impl ModelIndex {
    /// Parses `model_index.json` text (`path` is used in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, EngineError> {
        let bad = |message: String| EngineError::Model {
            path: path.to_path_buf(),
            message,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let class_name = obj
            .get("_class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no `_class_name` (is this a diffusers pipeline folder?)".into()))?
            .to_string();
        let mut components = BTreeMap::new();
        for (key, value) in obj {
            if key.starts_with('_') {
                continue;
            }
            match value.as_array().map(|a| a.as_slice()) {
                Some([Value::String(lib), Value::String(class)]) => {
                    components.insert(key.clone(), (lib.clone(), class.clone()));
                }
                // `[null, null]` marks an absent optional component.
                Some([Value::Null, Value::Null]) => {}
                _ => {
                    if value.is_array() {
                        return Err(bad(format!(
                            "`{key}`: expected [\"library\", \"ClassName\"], found {value}"
                        )));
                    }
                }
            }
        }
        Ok(ModelIndex {
            class_name,
            components,
        })
    }
}

/// A checked CogVideoX diffusers folder: every component folder present with a known class,
/// the transformer config parsed and the variant derived.
#[derive(Clone, Debug)]
pub struct ModelFolder {
    pub root: PathBuf,
    pub index: ModelIndex,
    pub variant: Variant,
    pub transformer_config: TransformerConfig,
    /// `scheduler/scheduler_config.json`, verbatim (what scheduler plugins receive).
    pub scheduler_config_json: String,
    /// The scheduler class named by `model_index.json`.
    pub scheduler_kind: SchedulerKind,
}

impl ModelFolder {
    /// Opens and checks `root`. Errors name the file and what to do.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, EngineError> {
        let root = root.as_ref().to_path_buf();
        let index_path = root.join("model_index.json");
        let text = std::fs::read_to_string(&index_path).map_err(|e| EngineError::Model {
            path: index_path.clone(),
            message: format!("cannot read it ({e}); point cogvx at a diffusers CogVideoX folder (the one holding model_index.json)"),
        })?;
        let index = ModelIndex::parse(&text, &index_path)?;
        let bad = |message: String| EngineError::Model {
            path: index_path.clone(),
            message,
        };
        let pipeline_i2v = KNOWN_PIPELINES
            .iter()
            .find(|(c, _)| *c == index.class_name)
            .map(|(_, i2v)| *i2v)
            .ok_or_else(|| {
                bad(format!(
                    "unknown pipeline class `{}`; cogvx loads {}",
                    index.class_name,
                    KNOWN_PIPELINES
                        .iter()
                        .map(|(c, _)| *c)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        for (component, classes) in KNOWN_COMPONENTS {
            let (_, class) = index
                .components
                .get(component)
                .ok_or_else(|| bad(format!("no `{component}` component")))?;
            if !classes.contains(&class.as_str()) {
                return Err(bad(format!(
                    "`{component}` is `{class}`, which cogvx cannot load (expected {})",
                    classes.join(" or ")
                )));
            }
            let dir = root.join(component);
            if !dir.is_dir() {
                return Err(EngineError::Model {
                    path: dir,
                    message: format!(
                        "the `{component}` folder named in model_index.json is missing"
                    ),
                });
            }
        }
        let config_path = root.join("transformer").join("config.json");
        let transformer_config: TransformerConfig =
            cogvx_model_core::config::read_config(&config_path)?;
        transformer_config
            .validate()
            .map_err(|message| EngineError::Model {
                path: config_path.clone(),
                message,
            })?;
        let variant =
            Variant::detect(&transformer_config).map_err(|message| EngineError::Model {
                path: config_path.clone(),
                message,
            })?;
        if variant.is_i2v() != pipeline_i2v {
            return Err(EngineError::Model {
                path: config_path,
                message: format!(
                    "model_index.json names `{}` but the transformer is a {} model ({variant}); the folder mixes components",
                    index.class_name,
                    if variant.is_i2v() { "image-to-video" } else { "text-to-video" }
                ),
            });
        }
        let scheduler_path = root.join("scheduler").join("scheduler_config.json");
        let scheduler_config_json =
            std::fs::read_to_string(&scheduler_path).map_err(|source| EngineError::Io {
                path: scheduler_path.clone(),
                source,
            })?;
        // Parse once now so that a bad scheduler config is reported at load time.
        cogvx_scheduler::SchedulerConfig::from_json(
            &scheduler_config_json,
            &scheduler_path.display().to_string(),
        )?;
        let scheduler_class = &index.components["scheduler"].1;
        let scheduler_kind = SchedulerKind::from_class_name(scheduler_class)
            .expect("checked against KNOWN_COMPONENTS");
        Ok(ModelFolder {
            root,
            index,
            variant,
            transformer_config,
            scheduler_config_json,
            scheduler_kind,
        })
    }

    /// The folder of a component (`transformer`, `vae`, ...).
    pub fn component_dir(&self, component: &str) -> PathBuf {
        self.root.join(component)
    }
}
