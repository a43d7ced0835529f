//! The TOML config (`--config FILE`): the single source of every setting, with CLI flags
//! overriding it. Unknown keys are rejected by name.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use cogvx_plugin_api::Resolution;

/// `[data] resolution` as TOML writes it: the string `FRAMESxHEIGHTxWIDTH` ([`Resolution`]'s
/// `FromStr`), e.g. `"49x480x720"`.
fn resolution_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Resolution>, D::Error> {
    String::deserialize(d)?
        .parse()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Where the models run: `cpu`, or `cuda` / `cuda:N` (GPU N, in a build with the `cuda` feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(format!("`{s}` is not a device: write `cpu`, `cuda` or `cuda:N` (N = the GPU's index, from 0)")),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Device {
    /// Refuses a GPU in a build without the `cuda` feature, naming the flag; `source` says
    /// where the choice came from.
    pub fn check_available(self, source: &str) -> Result<Self> {
        if matches!(self, Device::Cuda(_)) && !cfg!(feature = "cuda") {
            bail!(
                "{source} asks for `{self}`, but this cogvx was built without CUDA: rebuild with \
                 `cargo build --release -p cogvx --features cuda`, or use `--device cpu`"
            );
        }
        if let Device::Cuda(index) = self {
            // A GPU that does not exist is named here, not by a panic deep in the CUDA backend.
            if let Some(count) = gpu_count() {
                if count == 0 {
                    bail!("{source} asks for `{self}`, but nvidia-smi lists no GPU on this machine: use `--device cpu`");
                }
                if index >= count {
                    bail!(
                        "{source} asks for `{self}`, but this machine has {count} NVIDIA GPU{} (cuda:0{}): pick one of them",
                        if count == 1 { "" } else { "s" },
                        if count > 1 { format!(" to cuda:{}", count - 1) } else { String::new() }
                    );
                }
            }
        }
        Ok(self)
    }
}

/// NVIDIA GPUs on this machine, from `nvidia-smi -L` (`None` when it cannot be run).
fn gpu_count() -> Option<usize> {
    if !cfg!(feature = "cuda") {
        return None;
    }
    let out = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| count_gpus(&String::from_utf8_lossy(&out.stdout)))
}

/// The GPUs `nvidia-smi -L` lists (`GPU 0: NVIDIA H200 (UUID: ...)`, one per line).
fn count_gpus(listing: &str) -> usize {
    listing
        .lines()
        .filter(|l| l.trim_start().starts_with("GPU "))
        .count()
}

/// `[data]`: where the clips are and how they are preprocessed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset root in the finetune layout (prompts.txt, videos.txt, optional images.txt).
    pub root: Option<PathBuf>,
    /// Validation set in the same layout.
    pub validation_root: Option<PathBuf>,
    /// `FxHxW`; unset, [`DEFAULT_RESOLUTION`] (or `--resolution`).
    #[serde(default, deserialize_with = "resolution_str")]
    pub resolution: Option<Resolution>,
    /// The dataset reader plugin by name.
    #[serde(default = "default_reader")]
    pub reader: String,
    /// Video-transform plugins, applied in order.
    #[serde(default = "default_transforms")]
    pub transforms: Vec<String>,
    /// Prompt-rewriter plugins, applied in order.
    #[serde(default)]
    pub rewriters: Vec<String>,
    /// Base seed for per-sample randomness (random crops).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where `prepare` keeps the latent/prompt cache (default `<[train] output_dir>/cache`).
    /// Entries are keyed by content, so one cache can serve several runs.
    pub cache_dir: Option<PathBuf>,
    /// The official finetune's `--caption_column`, `--video_column`, `--image_column`: which
    /// file of the dataset root holds the captions, the clip paths, the image paths (defaults
    /// prompts.txt, videos.txt, images.txt when present). Handed to the reader as its
    /// parameters of the same names.
    pub caption_column: Option<String>,
    pub video_column: Option<String>,
    pub image_column: Option<String>,
    /// Aspect-ratio / length buckets: a list of `FxHxW` (each clip trains at the one nearest
    /// its aspect ratio, then the longest and largest it fills; each batch holds one bucket),
    /// or `"auto"` (sizes of several aspect ratios within `resolution`'s pixels, at its frame
    /// count and each halving of it). Unset: every clip at `resolution`.
    #[serde(default)]
    pub buckets: Option<BucketsSpec>,
    /// How far a clip may be upscaled to reach its bucket (1 = never); a clip that would need
    /// more is dropped. Default 1 with `buckets`, no limit without.
    pub max_upscale: Option<f64>,
}

/// `[data] buckets` as written: `"auto"` or a list of `FxHxW` strings.
#[derive(Clone, Debug, PartialEq)]
pub enum BucketsSpec {
    Auto,
    List(Vec<Resolution>),
}

impl<'de> Deserialize<'de> for BucketsSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let what = "[data] buckets: write \"auto\" or a list of FRAMESxHEIGHTxWIDTH, e.g. [\"49x480x720\", \"49x720x480\"]";
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(what))? {
            Raw::One(s) if s.trim().eq_ignore_ascii_case("auto") => Ok(BucketsSpec::Auto),
            Raw::One(s) => Err(serde::de::Error::custom(format!("{what} (got {s:?})"))),
            Raw::Many(list) => list
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.parse::<Resolution>()
                        .map_err(|e| serde::de::Error::custom(format!("[data] buckets[{i}]: {e}")))
                })
                .collect::<Result<_, _>>()
                .map(BucketsSpec::List),
        }
    }
}

impl DataConfig {
    /// The training resolutions: `buckets` (with `resolution` as the budget of `"auto"`), or
    /// `resolution` alone; `max_upscale` applied. The message names the key.
    pub fn buckets(&self, resolution: Resolution) -> Result<cogvx_data::Buckets, String> {
        use cogvx_data::Buckets;
        match &self.buckets {
            None => Buckets::single(resolution).with_max_upscale(self.max_upscale),
            Some(BucketsSpec::Auto) => Buckets::auto(resolution, self.max_upscale),
            Some(BucketsSpec::List(list)) => Buckets::new(list.clone(), self.max_upscale),
        }
    }
}

/// The resolution when neither the config nor `--resolution` gives one (the finetune's).
pub const DEFAULT_RESOLUTION: Resolution = Resolution {
    frames: 49,
    height: 480,
    width: 720,
};
fn default_reader() -> String {
    "finetune-layout".into()
}
fn default_transforms() -> Vec<String> {
    vec!["frame_skip".into(), "crop_resize".into()]
}
fn default_seed() -> u64 {
    42
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            root: None,
            validation_root: None,
            resolution: None,
            reader: default_reader(),
            transforms: default_transforms(),
            rewriters: Vec::new(),
            seed: default_seed(),
            cache_dir: None,
            caption_column: None,
            video_column: None,
            image_column: None,
            buckets: None,
            max_upscale: None,
        }
    }
}

/// What a run trains: text-to-video or image-to-video.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    T2v,
    I2v,
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Task::T2v => "t2v",
            Task::I2v => "i2v",
        })
    }
}

/// `[model]`: the diffusers model folder.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The diffusers folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
    /// scheduler/), relative to the config file.
    pub path: Option<PathBuf>,
    /// `"t2v"` or `"i2v"`: checked against the folder before any work starts (optional).
    pub task: Option<Task>,
    /// The released checkpoint this config is for (`cogvideox-2b`, `cogvideox-5b`,
    /// `cogvideox-5b-i2v`, `cogvideox1.5-5b`, `cogvideox1.5-5b-i2v`): `cogvx plan` sizes it
    /// without the weights; checked against the folder's architecture when both are given.
    pub name: Option<String>,
    /// A scheduler plugin by name (e.g. `cogvideox-dpm`, or `timestep_sampling` for a
    /// logit-normal or shifted timestep distribution): its tables give the training timestep
    /// distribution and loss weights, its plans (if it has any) the validation sampler. Default:
    /// the folder's own scheduler with uniform timesteps, as the official finetune.
    pub scheduler: Option<String>,
}

/// `[wasm]`: sandbox limits of WebAssembly plugins.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmConfig {
    /// Memory cap per plugin instance, in MiB.
    #[serde(default = "default_memory")]
    pub memory_limit_mib: u64,
    /// Time cap per plugin call, in seconds.
    #[serde(default = "default_timeout")]
    pub call_timeout_secs: f64,
}

/// Largest `[wasm] memory_limit_mib`: a 32-bit WebAssembly memory addresses 4 GiB.
pub const MAX_WASM_MEMORY_MIB: u64 = 4096;
/// Largest `[wasm] call_timeout_secs` (one day).
pub const MAX_WASM_CALL_SECS: f64 = 86_400.0;

impl WasmConfig {
    /// Checks the sandbox limits: a memory cap of 1 to 4096 MiB, a time cap of a positive
    /// number of seconds up to a day. The message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_WASM_MEMORY_MIB).contains(&self.memory_limit_mib) {
            return Err(format!(
                "[wasm] memory_limit_mib = {}: give the memory cap of a WASM plugin in MiB, from 1 to {MAX_WASM_MEMORY_MIB} (a 32-bit WebAssembly memory addresses 4 GiB); default 512",
                self.memory_limit_mib
            ));
        }
        let t = self.call_timeout_secs;
        if !(t.is_finite() && t > 0.0 && t <= MAX_WASM_CALL_SECS) {
            return Err(format!(
                "[wasm] call_timeout_secs = {t}: give the time cap of one plugin call in seconds, more than 0 and at most {MAX_WASM_CALL_SECS} (a day); default 30"
            ));
        }
        Ok(())
    }

    /// The limits handed to the plugin host (call [`WasmConfig::validate`] first).
    pub fn limits(&self) -> cogvx_plugin_host::WasmLimits {
        cogvx_plugin_host::WasmLimits {
            max_memory_bytes: (self.memory_limit_mib.clamp(1, MAX_WASM_MEMORY_MIB) as usize) << 20,
            call_timeout: std::time::Duration::from_secs_f64(
                self.call_timeout_secs.clamp(1e-3, MAX_WASM_CALL_SECS),
            ),
        }
    }
}

fn default_memory() -> u64 {
    512
}
fn default_timeout() -> f64 {
    30.0
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            memory_limit_mib: default_memory(),
            call_timeout_secs: default_timeout(),
        }
    }
}

/// The whole config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Plugin files (`.wasm` or `.so`) to load, relative to the config file.
    #[serde(default)]
    pub plugins: Vec<PathBuf>,
    /// Where the models run (`cpu`, `cuda`, `cuda:N`); `--device` overrides it.
    pub device: Option<Device>,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub data: DataConfig,
    /// `[train]`: adapter, optimizer, schedule, steps, checkpoints, output folder.
    #[serde(default)]
    pub train: cogvx_trainer::TrainConfig,
    /// `[validation]`: prompts sampled every N steps, and the validator plugins.
    #[serde(default)]
    pub validation: cogvx_trainer::ValidationConfig,
    #[serde(default)]
    pub wasm: WasmConfig,
    /// `[plugin.<name>]`: parameters handed to each plugin's `configure`.
    #[serde(default)]
    pub plugin: BTreeMap<String, toml::Table>,
}

impl Config {
    /// Reads `path`; relative paths inside are resolved against the file's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e))?;
        config
            .wasm
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        config.plugins.iter_mut().for_each(resolve);
        if let Some(p) = config.data.root.as_mut() {
            resolve(p);
        }
        if let Some(p) = config.data.validation_root.as_mut() {
            resolve(p);
        }
        if let Some(p) = config.data.cache_dir.as_mut() {
            resolve(p);
        }
        if let Some(p) = config.model.path.as_mut() {
            resolve(p);
        }
        resolve(&mut config.train.output_dir);
        config.validation.images.iter_mut().for_each(resolve);
        Ok(config)
    }

    /// The `[plugin.<name>]` table of a plugin as JSON (`{}` when absent).
    pub fn plugin_params_json(&self, name: &str) -> Result<String> {
        match self.plugin.get(name) {
            None => Ok("{}".into()),
            Some(table) => serde_json::to_string(table)
                .with_context(|| format!("[plugin.{name}] cannot be converted to JSON")),
        }
    }

    /// The dataset reader's parameters: its `[plugin.<reader>]` table with the `[data]`
    /// column keys that are set added (a key set in both places to different values is an
    /// error naming both).
    pub fn reader_params_json(&self) -> Result<String> {
        let reader = &self.data.reader;
        let mut params = match serde_json::from_str(&self.plugin_params_json(reader)?)? {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        for (key, value) in [
            ("caption_column", &self.data.caption_column),
            ("video_column", &self.data.video_column),
            ("image_column", &self.data.image_column),
        ] {
            let Some(value) = value else { continue };
            match params.get(key) {
                Some(serde_json::Value::String(v)) if v == value => {}
                Some(other) => bail!(
                    "config: [data] {key} = {value:?} but [plugin.{reader}] {key} = {other}; set it in one place"
                ),
                None => {
                    params.insert(key.into(), value.clone().into());
                }
            }
        }
        Ok(serde_json::Value::Object(params).to_string())
    }

    /// Checks that every `[plugin.<name>]` table names a known plugin.
    pub fn check_plugin_tables(&self, known: &[String]) -> Result<()> {
        for name in self.plugin.keys() {
            if !known.iter().any(|k| k == name) {
                bail!(
                    "config: [plugin.{name}] names no loaded plugin (known: {})",
                    known.join(", ")
                );
            }
        }
        Ok(())
    }
}

/// Removes `.` and `name/..` pairs without touching the file system (`configs/../out` → `out`),
/// so paths in messages read as the user would write them.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_rules() {
        assert_eq!(
            "49x480x720".parse::<Resolution>().unwrap(),
            Resolution {
                frames: 49,
                height: 480,
                width: 720
            }
        );
        assert!("48x480x720"
            .parse::<Resolution>()
            .unwrap_err()
            .contains("8N+1"));
        assert!("49x470x720"
            .parse::<Resolution>()
            .unwrap_err()
            .contains("multiples of 16"));
        assert!("49x480"
            .parse::<Resolution>()
            .unwrap_err()
            .contains("FRAMESxHEIGHTxWIDTH"));
    }

    #[test]
    fn device_names() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("cuda:x".parse::<Device>().unwrap_err().contains("cuda:N"));
        assert!("tpu"
            .parse::<Device>()
            .unwrap_err()
            .contains("`tpu` is not a device"));
        let c: Config = toml::from_str("device = \"cuda:1\"\n").unwrap();
        assert_eq!(c.device, Some(Device::Cuda(1)));
        assert!(toml::from_str::<Config>("device = \"gpu7\"\n")
            .unwrap_err()
            .to_string()
            .contains("not a device"));
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        let cpu = Device::Cpu.check_available("--device");
        assert!(cpu.is_ok());
        let gpu = Device::Cuda(0).check_available("--device");
        if cfg!(feature = "cuda") {
            assert!(gpu.is_ok());
        } else {
            let e = gpu.unwrap_err().to_string();
            assert!(
                e.contains("--features cuda") && e.contains("--device"),
                "{e}"
            );
        }
    }

    #[test]
    fn gpus_are_counted_from_nvidia_smi() {
        let listing = "GPU 0: NVIDIA H200 (UUID: GPU-1)\nGPU 1: NVIDIA H200 (UUID: GPU-2)\n  MIG 1g.18gb Device 0: (UUID: MIG-1)\n";
        assert_eq!(count_gpus(listing), 2);
        assert_eq!(count_gpus(""), 0);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = toml::from_str::<Config>("[data]\nroot = \"x\"\nresolutoin = \"49x480x720\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("resolutoin"), "{err}");
        let err = toml::from_str::<Config>("pluginz = []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pluginz"), "{err}");
    }

    /// Every shipped config parses (no unknown key) and its [train] / [validation] values pass
    /// the trainer's checks.
    #[test]
    fn shipped_configs_are_valid() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs"));
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            c.train
                .validate()
                .unwrap_or_else(|e| panic!("{} [train]: {e}", path.display()));
            c.validation
                .validate()
                .unwrap_or_else(|e| panic!("{} [validation]: {e}", path.display()));
            assert!(
                c.data.resolution.is_some(),
                "{}: set [data] resolution explicitly",
                path.display()
            );
            n += 1;
        }
        assert!(
            n >= 12,
            "expected the 10 presets, quickstart and mini in configs/, found {n}"
        );
    }

    #[test]
    fn relative_paths_are_normalized() {
        assert_eq!(
            normalize(Path::new("configs/../out/x")),
            PathBuf::from("out/x")
        );
        assert_eq!(normalize(Path::new("./a/./b")), PathBuf::from("a/b"));
        assert_eq!(
            normalize(Path::new("../../shared/x")),
            PathBuf::from("../../shared/x")
        );
        assert_eq!(normalize(Path::new("configs/..")), PathBuf::from("."));
    }

    #[test]
    fn plugin_params_become_json() {
        let c: Config =
            toml::from_str("[plugin.id_token]\ntoken = \"BW\"\nposition = \"prefix\"\n").unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&c.plugin_params_json("id_token").unwrap()).unwrap();
        assert_eq!(json["token"], "BW");
        assert_eq!(c.plugin_params_json("other").unwrap(), "{}");
    }
}
