//! # `dora` — DoRA, weight-decomposed low-rank adaptation (PEFT `LoraConfig(use_dora=True)`)
//!
//! An adapter plugin: for every target `nn.Linear` (`W [out, in]`) it answers a recipe that the
//! host's interpreter (`cogvx_model_core::adapter::RecipeAdapter`) lowers to differentiable ops.
//! The effective weight, as PEFT's `DoraLinearLayer` computes it (`peft/tuners/lora/dora.py`):
//!
//! ```text
//! V  = W + s · lora_B @ lora_A                         s = alpha / r  (alpha / sqrt(r) with use_rslora)
//! W' = (lora_magnitude_vector / ‖V‖_row.detach()) ⊙ V  ‖V‖_row[i] = L2 norm of row i of V,
//!                                                      broadcast over the rows
//! y  = x W'ᵀ + b
//! ```
//!
//! Parameters and initialisation (PEFT's `reset_lora_parameters` and `DoraLinearLayer.update_layer`):
//!
//! | recipe parameter / export suffix | shape     | init                                                     |
//! |----------------------------------|-----------|----------------------------------------------------------|
//! | `lora_A.weight`                  | `[r, in]` | kaiming-uniform `a = √5` (`init_lora_weights = true`) or Normal(0, 1/r) (`"gaussian"`) |
//! | `lora_B.weight`                  | `[out, r]`| zeros                                                    |
//! | `lora_magnitude_vector`          | `[out]`   | `‖W + s·B@A‖_row = ‖W‖_row` (B is zero)                  |
//!
//! so at initialisation `W' = W` exactly. The export keys are PEFT's (`<layer>.lora_A.weight`,
//! `<layer>.lora_B.weight`, `<layer>.lora_magnitude_vector`), the PEFT type `LORA` (a DoRA is a
//! LoRA with `use_dora = true` in PEFT's `adapter_config.json`).
//!
//! ## Gradient: the norm is detached, as in PEFT
//!
//! PEFT detaches `‖V‖_row` (`weight_norm = weight_norm.detach()`; DoRA paper §4.3: the norm
//! reflects the updates of `V` in the forward pass but is treated as a constant in the backward
//! pass). The recipe does the same with the API's stop-gradient op (`Op::Detach` on the row
//! norm), so with `G = ∂L/∂W'`, row `i`, `c_i = ‖V_i‖`, the gradients are PEFT's:
//!
//! ```text
//! ∂L/∂m_i    = ⟨G_i, V_i⟩ / c_i
//! ∂L/∂V_i    = (m_i / c_i) · G_i
//! ∂L/∂lora_B = s · ∂L/∂V · lora_Aᵀ,   ∂L/∂lora_A = s · lora_Bᵀ · ∂L/∂V
//! ```
//!
//! (not the exact gradient of the DoRA objective, which would subtract from `∂L/∂V_i` its
//! component along `V_i`). `tests/recipe.rs` checks these formulas against the interpreter's
//! autodiff. `Op::Detach` was added to the API after its first 0.1.0 plugins; a host that
//! predates it refuses this recipe (invalid `AdapterRecipe` JSON) rather than misreading it.
//!
//! ## Configuration (`[plugin.dora]`)
//!
//! ```toml
//! [plugin.dora]
//! init_lora_weights = true   # PEFT's default (kaiming-uniform lora_A); or "gaussian" (Normal(0, 1/r))
//! use_rslora = false         # true: s = alpha / sqrt(r) (rank-stabilised LoRA)
//! ```
//!
//! Rank, alpha and target modules come from the trainer (`rank`, `alpha`, `targets`). PEFT's
//! `init_lora_weights = false` (random `lora_B`) is refused: its magnitude would start at the
//! row norm of `W + s·B@A`, which the API's initialisers cannot express. `lora_dropout` is not
//! offered (the interpreter adapts the weight, not the activations). Unknown keys are rejected
//! by name.

use cogvx_plugin_api::{
    AdapterOutput, AdapterRecipe, AdapterRequest, Dim, ExportKey, Init, Op, ParamSpec, Plugin,
    PluginError, PluginInfo, PluginKind, PluginResult,
};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The plugin's name (`adapter = "dora"` in the training config).
pub const NAME: &str = "dora";

/// PEFT's `init_lora_weights` values that DoRA supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// `true`: `lora_A` kaiming-uniform with `a = √5` (as `nn.Linear`), `lora_B` zeros.
    #[default]
    Kaiming,
    /// `"gaussian"`: `lora_A` Normal(0, 1/r), `lora_B` zeros.
    Gaussian,
}

impl<'de> Deserialize<'de> for LoraInit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = LoraInit;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true or \"gaussian\"")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<LoraInit, E> {
                if v {
                    Ok(LoraInit::Kaiming)
                } else {
                    Err(E::custom(
                        "false is not supported by DoRA here (it starts from a random lora_B, and the magnitude would \
                         have to start at the row norm of W + s*B@A); use true or \"gaussian\"",
                    ))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LoraInit, E> {
                match v {
                    "gaussian" => Ok(LoraInit::Gaussian),
                    _ => Err(E::custom(format!(
                        "\"{v}\" is not supported by DoRA here; use true or \"gaussian\" \
                         (PEFT's pissa/olora/loftq/eva/corda initialisations need the base weights' decompositions)"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The `[plugin.dora]` table.
#[derive(Clone, Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PEFT's `init_lora_weights`.
    #[serde(deserialize_with = "de_init_lora_weights")]
    pub init_lora_weights: LoraInit,
    /// PEFT's `use_rslora`: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(deserialize_with = "de_use_rslora")]
    pub use_rslora: bool,
}

cogvx_plugin_api::keyed_fields! {
    de_init_lora_weights: LoraInit = "init_lora_weights";
    de_use_rslora: bool = "use_rslora";
}

/// Parses the `[plugin.dora]` table (as JSON).
pub fn parse_config(params_json: &str) -> PluginResult<Config> {
    cogvx_plugin_api::parse_params(NAME, params_json)
}

/// The `dora` plugin.
#[derive(Clone, Debug, Default)]
pub struct Dora {
    config: Config,
}

/// The DoRA recipe for one layer under `config` (see the crate docs for the formula).
pub fn recipe(config: &Config, request: &AdapterRequest) -> PluginResult<AdapterRecipe> {
    request
        .check()
        .map_err(|e| PluginError::Invalid(format!("{NAME}: {e}")))?;
    let a_init = match config.init_lora_weights {
        LoraInit::Kaiming => Init::KaimingUniform { a: 5f32.sqrt() },
        LoraInit::Gaussian => Init::Normal {
            std: 1.0 / request.rank as f32,
        },
    };
    let param = |name: &str, shape: Vec<Dim>, init: Init| ParamSpec {
        name: name.into(),
        shape,
        init,
        trainable: true,
    };
    let scaled = if config.use_rslora {
        // PEFT: scaling = lora_alpha / math.sqrt(r).
        Op::Scale(
            3,
            (request.alpha as f64 / (request.rank as f64).sqrt()) as f32,
        )
    } else {
        Op::AlphaOverRank(3)
    };
    Ok(AdapterRecipe {
        params: vec![
            param("lora_A", vec![Dim::Rank, Dim::In], a_init),
            param("lora_B", vec![Dim::Out, Dim::Rank], Init::Zeros),
            param("lora_magnitude_vector", vec![Dim::Out], Init::BaseRowNorm),
        ],
        // 0 W, 1 B, 2 A, 3 B@A, 4 s*B@A, 5 V = W + s*B@A, 6 the row norm of V, 7 the norm
        // detached (PEFT's `weight_norm.detach()`), 8 m, 9 m / norm, 10 W' = (m / norm) * V.
        graph: vec![
            Op::BaseWeight,
            Op::Param("lora_B".into()),
            Op::Param("lora_A".into()),
            Op::Matmul(1, 2),
            scaled,
            Op::Add(0, 4),
            Op::RowNorm(5),
            Op::Detach(6),
            Op::Param("lora_magnitude_vector".into()),
            Op::Div(8, 7),
            Op::Mul(9, 5),
        ],
        output: 10,
        output_kind: AdapterOutput::Weight,
        export: vec![
            ExportKey {
                param: "lora_A".into(),
                suffix: "lora_A.weight".into(),
            },
            ExportKey {
                param: "lora_B".into(),
                suffix: "lora_B.weight".into(),
            },
            ExportKey {
                param: "lora_magnitude_vector".into(),
                suffix: "lora_magnitude_vector".into(),
            },
        ],
        peft_type: "LORA".into(),
    })
}

impl Plugin for Dora {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kinds: vec![PluginKind::Adapter],
            description:
                "DoRA (PEFT LoRA with use_dora): magnitude times the row-normalised W + s*B@A"
                    .to_string(),
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

cogvx_plugin_api::export_plugin!(Dora);
