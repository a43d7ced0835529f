//! Loading diffusers CogVideoX folders: variant detection and the errors of a bad folder.

use std::path::{Path, PathBuf};

use cogvx_engine::{EngineError, ModelFolder, Variant};
use cogvx_scheduler::SchedulerKind;

fn models() -> PathBuf {
    cogvx_fixtures::reference("models")
}

#[test]
fn detects_every_reference_variant() {
    let models = models();
    for (folder, variant) in [
        ("cogvideox-2b-tiny", Variant::CogVideoX2b),
        ("cogvideox-5b-tiny", Variant::CogVideoX5b),
        ("cogvideox-5b-i2v-tiny", Variant::CogVideoX5bI2v),
        ("cogvideox1.5-5b-tiny", Variant::CogVideoX15_5b),
        ("cogvideox1.5-5b-i2v-tiny", Variant::CogVideoX15_5bI2v),
    ] {
        let m = ModelFolder::open(models.join(folder)).unwrap_or_else(|e| panic!("{folder}: {e}"));
        assert_eq!(m.variant, variant, "{folder}");
        assert_eq!(m.scheduler_kind, SchedulerKind::Ddim);
        assert_eq!(m.variant.is_i2v(), folder.contains("i2v"));
    }
}

/// A copy of a reference folder's configs (no weights: opening a folder reads configs only).
fn config_copy(models: &Path, folder: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = models.join(folder);
    std::fs::copy(
        src.join("model_index.json"),
        tmp.path().join("model_index.json"),
    )
    .unwrap();
    for (component, file) in [
        ("transformer", "config.json"),
        ("vae", "config.json"),
        ("text_encoder", "config.json"),
        ("tokenizer", "tokenizer_config.json"),
        ("scheduler", "scheduler_config.json"),
    ] {
        std::fs::create_dir(tmp.path().join(component)).unwrap();
        std::fs::copy(
            src.join(component).join(file),
            tmp.path().join(component).join(file),
        )
        .unwrap();
    }
    tmp
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn open_err(dir: &Path) -> String {
    let e: EngineError = ModelFolder::open(dir).unwrap_err();
    e.to_string()
}

#[test]
fn bad_folders_give_clear_errors() {
    let models = models();
    // Not a diffusers folder at all.
    let empty = tempfile::tempdir().unwrap();
    let m = open_err(empty.path());
    assert!(
        m.contains("model_index.json") && m.contains("diffusers CogVideoX folder"),
        "{m}"
    );

    // The copy opens as the original.
    let tmp = config_copy(&models, "cogvideox-5b-tiny");
    assert_eq!(
        ModelFolder::open(tmp.path()).unwrap().variant,
        Variant::CogVideoX5b
    );

    // Unknown pipeline class.
    edit_json(&tmp.path().join("model_index.json"), |v| {
        v["_class_name"] = "StableDiffusionPipeline".into()
    });
    let m = open_err(tmp.path());
    assert!(
        m.contains("unknown pipeline class `StableDiffusionPipeline`")
            && m.contains("CogVideoXPipeline"),
        "{m}"
    );

    // Unknown component class.
    let tmp = config_copy(&models, "cogvideox-5b-tiny");
    edit_json(&tmp.path().join("model_index.json"), |v| {
        v["scheduler"] = serde_json::json!(["diffusers", "EulerDiscreteScheduler"])
    });
    let m = open_err(tmp.path());
    assert!(
        m.contains("`scheduler` is `EulerDiscreteScheduler`")
            && m.contains("CogVideoXDPMScheduler"),
        "{m}"
    );

    // Missing component folder.
    let tmp = config_copy(&models, "cogvideox-5b-tiny");
    std::fs::remove_dir_all(tmp.path().join("vae")).unwrap();
    let m = open_err(tmp.path());
    assert!(m.contains("vae") && m.contains("missing"), "{m}");

    // A transformer config no CogVideoX checkpoint has.
    let tmp = config_copy(&models, "cogvideox-5b-tiny");
    edit_json(&tmp.path().join("transformer/config.json"), |v| {
        v["in_channels"] = 12.into()
    });
    let m = open_err(tmp.path());
    assert!(
        m.contains("unknown CogVideoX variant") && m.contains("in_channels = 12"),
        "{m}"
    );
    let tmp = config_copy(&models, "cogvideox1.5-5b-i2v-tiny");
    edit_json(&tmp.path().join("transformer/config.json"), |v| {
        v["ofs_embed_dim"] = serde_json::Value::Null
    });
    let m = open_err(tmp.path());
    assert!(
        m.contains("unknown CogVideoX variant") && m.contains("ofs_embed_dim = None"),
        "{m}"
    );

    // A text-to-video pipeline class around an image-to-video transformer.
    let tmp = config_copy(&models, "cogvideox-5b-i2v-tiny");
    edit_json(&tmp.path().join("model_index.json"), |v| {
        v["_class_name"] = "CogVideoXPipeline".into()
    });
    let m = open_err(tmp.path());
    assert!(
        m.contains("image-to-video") && m.contains("mixes components"),
        "{m}"
    );

    // A bad scheduler value is reported at load time, naming file and key.
    let tmp = config_copy(&models, "cogvideox-2b-tiny");
    edit_json(&tmp.path().join("scheduler/scheduler_config.json"), |v| {
        v["timestep_spacing"] = "sometimes".into()
    });
    let m = open_err(tmp.path());
    assert!(
        m.contains("scheduler_config.json") && m.contains("timestep_spacing"),
        "{m}"
    );

    // The DPM scheduler is picked up from model_index.json.
    let tmp = config_copy(&models, "cogvideox-2b-tiny");
    edit_json(&tmp.path().join("model_index.json"), |v| {
        v["scheduler"] = serde_json::json!(["diffusers", "CogVideoXDPMScheduler"])
    });
    assert_eq!(
        ModelFolder::open(tmp.path()).unwrap().scheduler_kind,
        SchedulerKind::Dpm
    );
}
