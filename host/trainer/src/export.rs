//! The final export and its report.
//!
//! The built-in LoRA goes out in each of `[train] export_formats`: diffusers' layout
//! (`pytorch_lora_weights.safetensors`) and ComfyUI's (`lora_comfyui.safetensors`). Each LoRA file
//! is then read back as its tool would read it and checked: the keys written against the keys the
//! model has for the targets, and the output of one transformer forward with the file's LoRA
//! applied (at its alpha / rank) against the base model's (a LoRA that "loads but does nothing"
//! shows a change of 0) and against the trained model's (the file reproduces what was trained).
//! A plugin adapter goes out under PEFT's names, SFT as a diffusers transformer folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use cogvx_adapters::{LoadedLora, LoraMetadata};
use cogvx_model_core::{ModelAutodiffBackend, ModelBackend};
use cogvx_train::loss::OFS_VALUE;
use cogvx_train::AdapterSpec;
use cogvx_transformer::CogVideoXTransformer3DModel;
use serde::{Deserialize, Serialize};

use crate::{TrainConfig, TrainerError, SFT_EXPORT_DIR};

/// The report of the final export under `output_dir`.
pub const EXPORT_REPORT_FILE: &str = "export_report.json";

/// A layout the trained LoRA is exported in (`[train] export_formats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// diffusers' `pytorch_lora_weights.safetensors` (`pipe.load_lora_weights`), also what
    /// kijai's ComfyUI-CogVideoXWrapper loads.
    Diffusers,
    /// ComfyUI's native CogVideoX names, `lora_comfyui.safetensors` (the "Load LoRA" node).
    Comfyui,
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExportFormat::Diffusers => "diffusers",
            ExportFormat::Comfyui => "comfyui",
        })
    }
}

/// What one exported LoRA file holds and does, read back from the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportReport {
    pub format: ExportFormat,
    pub file: PathBuf,
    /// Tensors in the file.
    pub keys_written: usize,
    /// Tensors the format needs for the model's targeted layers.
    pub keys_expected: usize,
    /// Expected keys the file lacks, and keys it has that the target tool would not load.
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// `lora_alpha / r`, the scale the tool applies at strength 1.
    pub scale: f64,
    /// `‖y_lora − y_base‖ / ‖y_base‖` of one transformer forward on a fixed input, the file's
    /// LoRA applied at strength 1 (0 means the LoRA does nothing).
    pub output_change: f64,
    /// `‖y_lora − y_trained‖ / ‖y_trained‖`: how far the file's LoRA is from the trained model
    /// (float rounding only).
    pub difference_from_trained: f64,
}

/// Exports the run's result (see the module docs) and writes [`EXPORT_REPORT_FILE`] for LoRA
/// exports. Returns the main exported path (the first format's file, or the SFT / adapter
/// export) and the reports.
pub(crate) fn export<B: ModelAutodiffBackend>(
    model: &mut CogVideoXTransformer3DModel<B>,
    config: &TrainConfig,
    spec: &AdapterSpec,
    adapter_params: &serde_json::Value,
    source_transformer: &Path,
    out: &Path,
    device: &B::Device,
) -> Result<(PathBuf, Vec<ExportReport>), TrainerError> {
    if config.is_sft() {
        let dir = out.join(SFT_EXPORT_DIR);
        let f = cogvx_train::save_transformer_folder(
            model,
            source_transformer,
            &dir,
            cogvx_train::DEFAULT_MAX_SHARD_BYTES,
            config.export_dtype,
        )?;
        return Ok((f.dir, Vec::new()));
    }
    if !config.is_lora() {
        let mut meta = cogvx_train::adapter_metadata(model, spec, BTreeMap::new())?;
        meta.config = cogvx_train::peft_settings(&meta.peft_type, adapter_params);
        return Ok((cogvx_train::save_adapter(model, out, &meta)?, Vec::new()));
    }
    let meta = LoraMetadata {
        rank: config.rank,
        alpha: config.alpha,
        target_modules: config.target_modules.clone(),
    };
    let values = cogvx_train::trainable_values(model);
    let probe = Probe::new(model.valid(), device)?;
    let mut reports = Vec::new();
    for &format in &config.export_formats {
        let (path, loaded) = match format {
            ExportFormat::Diffusers => {
                let p = cogvx_adapters::save_lora(out, &values, &meta)?;
                let l = cogvx_adapters::load_lora(&p)?;
                (p, l)
            }
            ExportFormat::Comfyui => {
                let p = cogvx_adapters::save_lora_comfyui(out, &values, &meta)?;
                let l = cogvx_adapters::load_lora_comfyui(&p)?;
                (p, l)
            }
        };
        let report = probe.report(format, &path, &loaded, device)?;
        tracing::info!(
            "export {format}: {} ({} of {} keys{}{}), scale {:.4}, output change with the LoRA {:.3e}, \
             difference from the trained model {:.1e}",
            path.display(),
            report.keys_written,
            report.keys_expected,
            if report.missing.is_empty() { String::new() } else { format!(", missing {:?}", report.missing) },
            if report.unexpected.is_empty() { String::new() } else { format!(", not loadable {:?}", report.unexpected) },
            report.scale,
            report.output_change,
            report.difference_from_trained,
        );
        if report.output_change == 0.0 {
            tracing::warn!(
                "the exported LoRA {} does not change the transformer's output (its lora_B weights are \
                 zero: the run did not train them; check the learning rate and the step count)",
                path.display()
            );
        }
        reports.push(report);
    }
    let json = serde_json::to_string_pretty(&reports).expect("reports serialize");
    let report_path = out.join(EXPORT_REPORT_FILE);
    cogvx_io::write_atomically(&report_path, json.as_bytes()).map_err(|e| TrainerError::Io {
        path: report_path,
        message: e.to_string(),
    })?;
    Ok((reports[0].file.clone(), reports))
}

/// What every LoRA file of one export is checked against, computed once: the trained model's
/// adapted layers, the base model (the trained one without its adapters; weights are shared, not
/// copied) and the outputs of both on the probe input ([`probe_forward`]).
struct Probe<B: ModelBackend> {
    adapted: Vec<String>,
    base: CogVideoXTransformer3DModel<B>,
    y_base: Vec<f32>,
    y_trained: Vec<f32>,
}

impl<B: ModelBackend> Probe<B> {
    fn new(
        mut trained: CogVideoXTransformer3DModel<B>,
        device: &B::Device,
    ) -> Result<Self, TrainerError> {
        let y_trained = probe_forward(&trained, device)?;
        let mut adapted = Vec::new();
        for (name, layer) in cogvx_adapters::linear_layers_mut(&mut trained) {
            if layer.adapter.take().is_some() {
                adapted.push(name);
            }
        }
        let y_base = probe_forward(&trained, device)?;
        Ok(Probe {
            adapted,
            base: trained,
            y_base,
            y_trained,
        })
    }

    /// The report of one LoRA file (see [`ExportReport`]), with `loaded` read back from `path`.
    fn report(
        &self,
        format: ExportFormat,
        path: &Path,
        loaded: &LoadedLora,
        device: &B::Device,
    ) -> Result<ExportReport, TrainerError> {
        // The keys the format needs for every layer the trained model adapts.
        let expected: Vec<String> = match format {
            ExportFormat::Diffusers => self
                .adapted
                .iter()
                .flat_map(|m| ["lora_A", "lora_B"].map(|h| format!("transformer.{m}.{h}.weight")))
                .collect(),
            ExportFormat::Comfyui => {
                cogvx_adapters::comfyui_keys(self.adapted.iter().map(String::as_str))?
            }
        };
        let written = file_keys(path)?;
        let missing: Vec<String> = expected
            .iter()
            .filter(|k| !written.contains(*k))
            .cloned()
            .collect();
        let unexpected: Vec<String> = written
            .iter()
            .filter(|k| !expected.contains(*k))
            .cloned()
            .collect();
        let mut with_file = self.base.clone();
        cogvx_engine::apply_lora(&mut with_file, loaded, path, 1.0, device)?;
        let y_file = probe_forward(&with_file, device)?;
        let meta = loaded.metadata.as_ref();
        Ok(ExportReport {
            format,
            file: path.to_path_buf(),
            keys_written: written.len(),
            keys_expected: expected.len(),
            missing,
            unexpected,
            scale: meta.map_or(1.0, |m| m.alpha / m.rank as f64),
            output_change: relative_l2(&y_file, &self.y_base),
            difference_from_trained: relative_l2(&y_file, &self.y_trained),
        })
    }
}

/// The tensor names of a safetensors file, sorted.
fn file_keys(path: &Path) -> Result<Vec<String>, TrainerError> {
    let io = |message: String| TrainerError::Io {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| io(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| io(e.to_string()))?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    Ok(names)
}

/// `‖a − b‖ / ‖b‖` (0 when both are zero).
fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    if num == 0.0 {
        0.0
    } else {
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// One transformer forward on a fixed input: one latent frame (1.5: one frame pair), at most
/// 16x16 patches (the model's sample size when its positional embeddings are learned), a full
/// text sequence, timestep 500, all drawn from a fixed seed.
fn probe_forward<B: ModelBackend>(
    model: &CogVideoXTransformer3DModel<B>,
    device: &B::Device,
) -> Result<Vec<f32>, TrainerError> {
    let c = &model.config;
    let p = c.patch_size;
    let side = |sample: usize| {
        if c.use_learned_positional_embeddings {
            sample
        } else {
            (sample.min(16 * p) / p).max(1) * p
        }
    };
    let (f, h, w) = (
        c.patch_size_t.unwrap_or(1),
        side(c.sample_height),
        side(c.sample_width),
    );
    let latents = cogvx_scheduler::noise::gaussian_noise(1, f * c.in_channels * h * w);
    let text = cogvx_scheduler::noise::gaussian_noise(2, c.max_text_seq_length * c.text_embed_dim);
    let latents = Tensor::<B, 5>::from_data(
        TensorData::new(latents, [1, f, c.in_channels, h, w]),
        device,
    );
    let text = Tensor::<B, 3>::from_data(
        TensorData::new(text, [1, c.max_text_seq_length, c.text_embed_dim]),
        device,
    );
    let t = Tensor::<B, 1>::from_data(TensorData::new(vec![500.0f32], [1]), device);
    let ofs = c
        .ofs_embed_dim
        .map(|_| Tensor::<B, 1>::from_data(TensorData::new(vec![OFS_VALUE], [1]), device));
    let rotary = model.image_rotary_emb(f, h, w, device)?;
    let y = model.forward(latents, text, t, ofs, rotary.as_ref())?;
    y.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| TrainerError::Input(format!("transformer output: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_l2_is_zero_only_for_equal_outputs() {
        assert_eq!(relative_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert_eq!(relative_l2(&[0.0], &[0.0]), 0.0);
        assert!(relative_l2(&[3.0, 4.0], &[0.0, 0.0]) > 1e100);
        assert!((relative_l2(&[1.0, 1.0], &[1.0, 0.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn formats_read_as_written() {
        #[derive(Deserialize)]
        struct T {
            f: Vec<ExportFormat>,
        }
        let t: T = toml::from_str("f = [\"diffusers\", \"comfyui\"]").unwrap();
        assert_eq!(t.f, vec![ExportFormat::Diffusers, ExportFormat::Comfyui]);
        assert_eq!(ExportFormat::Comfyui.to_string(), "comfyui");
        assert!(toml::from_str::<T>("f = [\"kohya\"]").is_err());
    }
}
