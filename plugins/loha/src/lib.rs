//! # `loha` — LoHa, low-rank Hadamard product adaptation (PEFT `LoHaConfig`)
//!
//! An adapter plugin: for every target `nn.Linear` (`W [out, in]`) it answers a recipe that the
//! host's interpreter (`cogvx_model_core::adapter::RecipeAdapter`) lowers to differentiable ops.
//! The weight delta, as PEFT's `LoHaLayer.get_delta_weight` computes it (`peft/tuners/loha/layer.py`,
//! `HadaWeight`):
//!
//! ```text
//! ΔW = ((hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b)) · alpha / r
//! y  = x Wᵀ + b + x ΔWᵀ
//! ```
//!
//! PEFT's `HadaWeight` is a custom autograd function whose backward is the analytic gradient of
//! this product, which is what the interpreter's autodiff computes.
//!
//! Parameters and initialisation (PEFT's `reset_adapter_parameters`, FedPara's He init):
//!
//! | parameter / export suffix | shape      | `init_weights = true` (default)  | `init_weights = false` |
//! |---------------------------|------------|----------------------------------|------------------------|
//! | `hada_w1_a`               | `[out, r]` | kaiming-uniform `a = √5`         | kaiming-uniform        |
//! | `hada_w1_b`               | `[r, in]`  | kaiming-uniform `a = √5`         | kaiming-uniform        |
//! | `hada_w2_a`               | `[out, r]` | kaiming-uniform `a = √5`         | kaiming-uniform        |
//! | `hada_w2_b`               | `[r, in]`  | zeros                            | kaiming-uniform        |
//!
//! so with the default init `ΔW = 0` at the start. Kaiming-uniform is PyTorch's over the fan-in
//! (the last dimension: `r` for the `_a` factors, `in` for the `_b` factors). The export keys are
//! PEFT's (`<layer>.hada_w1_a`, ...), the PEFT type `LOHA`.
//!
//! ## Configuration (`[plugin.loha]`)
//!
//! ```toml
//! [plugin.loha]
//! init_weights = true   # PEFT's default: hada_w2_b starts at zero (ΔW = 0); false: all random
//! ```
//!
//! Rank, alpha and target modules come from the trainer. PEFT's `rank_dropout`,
//! `module_dropout` and `use_effective_conv2d` (convolutions only) are not offered. Unknown keys
//! are rejected by name.

use cogvx_plugin_api::{
    AdapterOutput, AdapterRecipe, AdapterRequest, Dim, ExportKey, Init, Op, ParamSpec, Plugin,
    PluginError, PluginInfo, PluginKind, PluginResult,
};
use serde::Deserialize;

/// The plugin's name (`adapter = "loha"` in the training config).
pub const NAME: &str = "loha";

/// The `[plugin.loha]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PEFT's `init_weights`: `true` starts `hada_w2_b` at zero (so `ΔW = 0`).
    #[serde(deserialize_with = "de_init_weights")]
    pub init_weights: bool,
}

cogvx_plugin_api::keyed_fields! {
    de_init_weights: bool = "init_weights";
}

impl Default for Config {
    fn default() -> Self {
        Config { init_weights: true }
    }
}

/// Parses the `[plugin.loha]` table (as JSON).
pub fn parse_config(params_json: &str) -> PluginResult<Config> {
    cogvx_plugin_api::parse_params(NAME, params_json)
}

/// The `loha` plugin.
#[derive(Clone, Debug, Default)]
pub struct Loha {
    config: Config,
}

/// The LoHa recipe for one layer under `config` (see the crate docs for the formula).
pub fn recipe(config: &Config, request: &AdapterRequest) -> PluginResult<AdapterRecipe> {
    request
        .check()
        .map_err(|e| PluginError::Invalid(format!("{NAME}: {e}")))?;
    let kaiming = Init::KaimingUniform { a: 5f32.sqrt() };
    let w2_b_init = if config.init_weights {
        Init::Zeros
    } else {
        kaiming.clone()
    };
    let param = |name: &str, shape: Vec<Dim>, init: Init| ParamSpec {
        name: name.into(),
        shape,
        init,
        trainable: true,
    };
    let names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
    Ok(AdapterRecipe {
        params: vec![
            param(names[0], vec![Dim::Out, Dim::Rank], kaiming.clone()),
            param(names[1], vec![Dim::Rank, Dim::In], kaiming.clone()),
            param(names[2], vec![Dim::Out, Dim::Rank], kaiming),
            param(names[3], vec![Dim::Rank, Dim::In], w2_b_init),
        ],
        graph: vec![
            Op::Param(names[0].into()), // 0
            Op::Param(names[1].into()), // 1
            Op::Matmul(0, 1),           // 2: w1_a @ w1_b
            Op::Param(names[2].into()), // 3
            Op::Param(names[3].into()), // 4
            Op::Matmul(3, 4),           // 5: w2_a @ w2_b
            Op::Mul(2, 5),              // 6: Hadamard product
            Op::AlphaOverRank(6),       // 7: * alpha / r
        ],
        output: 7,
        output_kind: AdapterOutput::WeightDelta,
        export: names
            .iter()
            .map(|n| ExportKey {
                param: n.to_string(),
                suffix: n.to_string(),
            })
            .collect(),
        peft_type: "LOHA".into(),
    })
}

impl Plugin for Loha {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kinds: vec![PluginKind::Adapter],
            description: "LoHa (PEFT): ΔW = (w1_a@w1_b) ⊙ (w2_a@w2_b) * alpha/r".to_string(),
        }
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        self.config = parse_config(params_json)?;
        Ok(())
    }

    fn adapter_recipe(&mut self, request: &AdapterRequest) -> PluginResult<AdapterRecipe> {
        recipe(&self.config, request)
    }
}

cogvx_plugin_api::export_plugin!(Loha);
