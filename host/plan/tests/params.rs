//! The parameter counts of `cogvx_plan::params` against the checkpoints themselves: the element
//! count of every tensor in the safetensors files of the tiny reference models
//! (`../shared/reference/models/*-tiny`, the real checkpoints' layout, keys and sharding), and the
//! publicly known sizes for the released configs in `configs/models/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cogvx_plan::params::{
    t5_encoder_parameters, transformer_block_parameters, transformer_parameters,
    vae_decoder_parameters, vae_encoder_parameters, vae_parameters,
};
use cogvx_text::T5Config;
use cogvx_transformer::TransformerConfig;
use cogvx_vae::VaeConfig;
use safetensors::SafeTensors;

const TINY: [&str; 5] = [
    "cogvideox-2b-tiny",
    "cogvideox-5b-tiny",
    "cogvideox-5b-i2v-tiny",
    "cogvideox1.5-5b-tiny",
    "cogvideox1.5-5b-i2v-tiny",
];

const RELEASED: [&str; 5] = [
    "cogvideox-2b",
    "cogvideox-5b",
    "cogvideox-5b-i2v",
    "cogvideox1.5-5b",
    "cogvideox1.5-5b-i2v",
];

/// `../shared/reference/models` next to the repository. These counts have no other oracle, so a
/// missing folder fails the test instead of skipping it.
fn reference_models() -> PathBuf {
    cogvx_fixtures::reference("models")
}

fn released_dir(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/models")).join(name)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Element count of every tensor in the `*.safetensors` files of `dir` (single-file or sharded),
/// by name.
fn stored(dir: &Path) -> BTreeMap<String, u64> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "{}: no *.safetensors file",
        dir.display()
    );
    let mut tensors = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let (_, metadata) = SafeTensors::read_metadata(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (name, info) in metadata.tensors() {
            let count = info.shape.iter().map(|&d| d as u64).product::<u64>();
            let previous = tensors.insert(name.clone(), count);
            assert!(
                previous.is_none(),
                "{}: tensor `{name}` is stored in two shards",
                dir.display()
            );
        }
    }
    tensors
}

fn total(tensors: &BTreeMap<String, u64>) -> u64 {
    tensors.values().sum()
}

fn with_prefix(tensors: &BTreeMap<String, u64>, prefix: &str) -> u64 {
    tensors
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn transformer_counts_equal_the_reference_checkpoints() {
    let models = reference_models();
    for name in TINY {
        let dir = models.join(name).join("transformer");
        let config: TransformerConfig = read_json(&dir.join("config.json"));
        let tensors = stored(&dir);
        let (want, got) = (total(&tensors), transformer_parameters(&config));
        eprintln!(
            "{name} transformer: {got} parameters ({} tensors stored)",
            tensors.len()
        );
        assert_eq!(
            got, want,
            "{name}: transformer parameters from the config vs the checkpoint"
        );
        for i in 0..config.num_layers {
            let block = with_prefix(&tensors, &format!("transformer_blocks.{i}."));
            assert_eq!(
                transformer_block_parameters(&config),
                block,
                "{name}: transformer_blocks.{i}"
            );
        }
    }
}

#[test]
fn vae_counts_equal_the_reference_checkpoints() {
    let models = reference_models();
    for name in TINY {
        let dir = models.join(name).join("vae");
        let config = VaeConfig::from_file(&dir.join("config.json"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let tensors = stored(&dir);
        let (encoder, decoder, all) = (
            vae_encoder_parameters(&config),
            vae_decoder_parameters(&config),
            vae_parameters(&config),
        );
        eprintln!("{name} vae: {all} parameters (encoder {encoder}, decoder {decoder}; {} tensors stored)", tensors.len());
        assert_eq!(
            all,
            total(&tensors),
            "{name}: VAE parameters from the config vs the checkpoint"
        );
        assert_eq!(
            encoder + decoder,
            all,
            "{name}: encoder + decoder (each with its quant conv) vs the whole VAE"
        );
        assert_eq!(
            encoder,
            with_prefix(&tensors, "encoder.") + with_prefix(&tensors, "quant_conv."),
            "{name}: encoder (and quant_conv)"
        );
        assert_eq!(
            decoder,
            with_prefix(&tensors, "decoder.") + with_prefix(&tensors, "post_quant_conv."),
            "{name}: decoder (and post_quant_conv)"
        );
    }
}

#[test]
fn t5_counts_equal_the_reference_checkpoints() {
    let models = reference_models();
    for name in TINY {
        let dir = models.join(name).join("text_encoder");
        let config =
            T5Config::from_file(&dir.join("config.json")).unwrap_or_else(|e| panic!("{name}: {e}"));
        let tensors = stored(&dir);
        // `encoder.embed_tokens.weight` is tied to `shared.weight`. The reference files store only
        // `shared.weight` (as `T5EncoderModel.save_pretrained` does); a checkpoint holding both
        // would hold the same matrix twice, so the copy is not counted.
        let tied = if tensors.contains_key("shared.weight") {
            tensors
                .get("encoder.embed_tokens.weight")
                .copied()
                .unwrap_or(0)
        } else {
            0
        };
        let want = total(&tensors) - tied;
        let got = t5_encoder_parameters(&config);
        eprintln!(
            "{name} text_encoder: {got} parameters ({} tensors stored, tied copy {tied})",
            tensors.len()
        );
        assert_eq!(
            got, want,
            "{name}: T5 encoder parameters from the config vs the checkpoint"
        );
    }
}

fn assert_near(what: &str, got: u64, want: f64, tolerance: f64) {
    let rel = (got as f64 - want).abs() / want;
    assert!(
        rel <= tolerance,
        "{what}: {got} parameters, expected {want:.3e} within {}% (off by {:.2}%)",
        tolerance * 100.0,
        rel * 100.0
    );
}

#[test]
fn released_configs_have_the_published_sizes() {
    for name in RELEASED {
        let dir = released_dir(name);
        let transformer: TransformerConfig = read_json(&dir.join("transformer/config.json"));
        let vae = VaeConfig::from_file(&dir.join("vae/config.json"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let t5 = T5Config::from_file(&dir.join("text_encoder/config.json"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (t, block) = (
            transformer_parameters(&transformer),
            transformer_block_parameters(&transformer),
        );
        let (v, ve, vd) = (
            vae_parameters(&vae),
            vae_encoder_parameters(&vae),
            vae_decoder_parameters(&vae),
        );
        let text = t5_encoder_parameters(&t5);
        eprintln!(
            "{name}: transformer {t} (block {block} x {}), vae {v} (encoder {ve}, decoder {vd}), t5 encoder {text}",
            transformer.num_layers
        );
        if name == "cogvideox-2b" {
            assert_near(&format!("{name} transformer"), t, 1.69e9, 0.02);
        } else {
            assert_near(&format!("{name} transformer"), t, 5.57e9, 0.03);
        }
        assert_near(&format!("{name} vae"), v, 2.16e8, 0.05);
        assert_near(
            &format!("{name} t5 encoder (T5-v1.1-XXL)"),
            text,
            4.76e9,
            0.02,
        );
        assert_eq!(ve + vd, v, "{name}: encoder + decoder");
    }
}

#[test]
fn odd_configs_do_not_panic() {
    let vae = VaeConfig {
        block_out_channels: vec![],
        ..VaeConfig::default()
    };
    assert_eq!(vae_parameters(&vae), 0);
    let vae = VaeConfig {
        layers_per_block: 0,
        ..VaeConfig::default()
    };
    assert!(vae_parameters(&vae) > 0);
    let t = TransformerConfig {
        num_attention_heads: usize::MAX,
        attention_head_dim: 2,
        patch_size: 0,
        temporal_compression_ratio: 0,
        use_learned_positional_embeddings: true,
        ..TransformerConfig::default()
    };
    assert_eq!(transformer_parameters(&t), u64::MAX);
    let t5: T5Config =
        serde_json::from_str(r#"{"num_layers": 0, "feed_forward_proj": "nonsense-a-b"}"#).unwrap();
    assert_eq!(t5_encoder_parameters(&t5), 32128 * 512 + 512);
}
