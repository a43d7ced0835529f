//! # `lokr` — LoKr, low-rank Kronecker product adaptation (PEFT `LoKrConfig`)
//!
//! An adapter plugin: for every target `nn.Linear` (`W [out, in]`) it answers a recipe that the
//! host's interpreter (`cogvx_model_core::adapter::RecipeAdapter`) lowers to differentiable ops.
//! The weight delta, as PEFT's `LoKrLayer.get_delta_weight` computes it (`peft/tuners/lokr/layer.py`):
//!
//! ```text
//! (in_m,  in_n)  = factorization(in,  decompose_factor)
//! (out_l, out_k) = factorization(out, decompose_factor)
//! w1 = lokr_w1                      [out_l, in_m]   or lokr_w1_a [out_l, r] @ lokr_w1_b [r, in_m]
//! w2 = lokr_w2                      [out_k, in_n]   or lokr_w2_a [out_k, r] @ lokr_w2_b [r, in_n]
//! ΔW = kron(w1, w2) · alpha / r     [out_l·out_k, in_m·in_n] = [out, in]
//! y  = x Wᵀ + b + x ΔWᵀ
//! ```
//!
//! with PEFT's choice of full or decomposed factors:
//! `w1` is decomposed iff `decompose_both && r < max(out_l, in_m) / 2`, and `w2` iff
//! `r < max(out_k, in_n) / 2`. [`factorization`] is PEFT's (from LyCORIS) line by line; the
//! plugin resolves it per layer and gives the factor shapes to the host as fixed sizes (the
//! API's `Dim::Factor` is a simpler rule that does not always agree with it).
//!
//! Initialisation (PEFT's three `init_weights` modes; kaiming-uniform is PyTorch's with
//! `a = √5` over the fan-in, the last dimension):
//!
//! | `init_weights`     | `lokr_w1` / `lokr_w1_a`, `lokr_w1_b`  | `lokr_w2` / `lokr_w2_a`, `lokr_w2_b` |
//! |--------------------|---------------------------------------|--------------------------------------|
//! | `true` (default)   | zeros / zeros, kaiming                | kaiming / kaiming, kaiming           |
//! | `"lycoris"`        | kaiming / kaiming, kaiming            | zeros / kaiming, zeros               |
//! | `false`            | kaiming / kaiming, kaiming            | kaiming / kaiming, kaiming           |
//!
//! so `ΔW = 0` at the start with `true` and `"lycoris"`. The export keys are PEFT's
//! (`<layer>.lokr_w1`, `<layer>.lokr_w1_a`, `<layer>.lokr_w1_b`, `<layer>.lokr_w2`,
//! `<layer>.lokr_w2_a`, `<layer>.lokr_w2_b`, whichever exist), the PEFT type `LOKR`.
//!
//! ## Configuration (`[plugin.lokr]`)
//!
//! ```toml
//! [plugin.lokr]
//! decompose_factor = -1    # PEFT's default: factors near the square root; or a positive factor
//! decompose_both = false   # also decompose the left factor w1 into w1_a @ w1_b (when r is small)
//! init_weights = true      # or "lycoris", or false
//! ```
//!
//! Rank, alpha and target modules come from the trainer. PEFT's `rank_dropout`,
//! `module_dropout`, `rank_dropout_scale` and `use_effective_conv2d` (convolutions only) are not
//! offered; `decompose_factor` must be `-1` or positive (PEFT would silently fall back to
//! `(1, dimension)` for other values). Unknown keys are rejected by name.

use cogvx_plugin_api::{
    AdapterOutput, AdapterRecipe, AdapterRequest, Dim, ExportKey, Init, Op, ParamSpec, Plugin,
    PluginError, PluginInfo, PluginKind, PluginResult,
};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The plugin's name (`adapter = "lokr"` in the training config).
pub const NAME: &str = "lokr";

/// PEFT's `init_weights` for LoKr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LokrInit {
    /// `true`: `w1` (or `w1_a`) zeros, the rest kaiming-uniform, so `ΔW = 0`.
    #[default]
    Peft,
    /// `"lycoris"`: `w2` (or `w2_b`) zeros, the rest kaiming-uniform, so `ΔW = 0`.
    Lycoris,
    /// `false`: every factor kaiming-uniform (a random `ΔW`; PEFT discourages it).
    Random,
}

impl<'de> Deserialize<'de> for LokrInit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = LokrInit;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or \"lycoris\"")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<LokrInit, E> {
                Ok(if v { LokrInit::Peft } else { LokrInit::Random })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LokrInit, E> {
                match v {
                    "lycoris" => Ok(LokrInit::Lycoris),
                    _ => Err(E::custom(format!(
                        "\"{v}\" is not a LoKr initialisation; use true, false or \"lycoris\""
                    ))),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The `[plugin.lokr]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PEFT's `decompose_factor`: `-1` (factors near the square root) or a positive factor.
    #[serde(deserialize_with = "de_decompose_factor")]
    pub decompose_factor: i64,
    /// PEFT's `decompose_both`: also decompose `w1` when the rank is small.
    #[serde(deserialize_with = "de_decompose_both")]
    pub decompose_both: bool,
    /// PEFT's `init_weights`.
    #[serde(deserialize_with = "de_init_weights")]
    pub init_weights: LokrInit,
}

cogvx_plugin_api::keyed_fields! {
    de_decompose_factor: i64 = "decompose_factor";
    de_decompose_both: bool = "decompose_both";
    de_init_weights: LokrInit = "init_weights";
}

impl Default for Config {
    fn default() -> Self {
        Config {
            decompose_factor: -1,
            decompose_both: false,
            init_weights: LokrInit::Peft,
        }
    }
}

/// Parses the `[plugin.lokr]` table (as JSON), refusing a `decompose_factor` other than `-1` or
/// a positive integer.
pub fn parse_config(params_json: &str) -> PluginResult<Config> {
    let config: Config = cogvx_plugin_api::parse_params(NAME, params_json)?;
    if config.decompose_factor == 0 || config.decompose_factor < -1 {
        return Err(PluginError::Invalid(format!(
            "{NAME}: bad [plugin.{NAME}] table: `decompose_factor`: {} must be -1 (factors near the square root) or a positive integer",
            config.decompose_factor
        )));
    }
    Ok(config)
}

/// PEFT's (LyCORIS') `factorization(dimension, factor)`: two numbers whose product is
/// `dimension`. A positive `factor` that divides `dimension` gives `(factor, dimension / factor)`
/// as is; otherwise the pair of divisors `(m, n)`, `m <= n`, is walked up from `(1, dimension)`
/// while `m < n` and the next divisor is at most `factor` (`-1`: no limit), so `-1` gives the
/// pair nearest the square root: `factorization(256, -1) = (16, 16)`, `(128, -1) = (8, 16)`,
/// `(127, -1) = (1, 127)`, `(128, 4) = (4, 32)`.
pub fn factorization(dimension: u32, factor: i64) -> (u32, u32) {
    let d = i64::from(dimension);
    if d == 0 {
        return (0, 0);
    }
    if factor > 0 && d % factor == 0 {
        return (factor as u32, (d / factor) as u32);
    }
    let factor = if factor == -1 { d } else { factor };
    let (mut m, mut n) = (1i64, d);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while d % new_m != 0 {
            new_m += 1;
        }
        let new_n = d / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        m = new_m;
        n = new_n;
    }
    if m > n {
        std::mem::swap(&mut m, &mut n);
    }
    (m as u32, n as u32)
}

/// The resolved LoKr layout of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `(out_l, out_k)`: `out = out_l * out_k`.
    pub out: (u32, u32),
    /// `(in_m, in_n)`: `in = in_m * in_n`.
    pub inp: (u32, u32),
    /// `w1` is one full matrix `lokr_w1` (else `lokr_w1_a @ lokr_w1_b`).
    pub use_w1: bool,
    /// `w2` is one full matrix `lokr_w2` (else `lokr_w2_a @ lokr_w2_b`).
    pub use_w2: bool,
}

/// PEFT's shapes and full/decomposed choice for a linear layer (`LoKrLayer.update_layer`).
pub fn layout(config: &Config, in_features: u32, out_features: u32, rank: u32) -> Layout {
    let (in_m, in_n) = factorization(in_features, config.decompose_factor);
    let (out_l, out_k) = factorization(out_features, config.decompose_factor);
    let r = f64::from(rank);
    let use_w1 = !(config.decompose_both && r < f64::from(out_l.max(in_m)) / 2.0);
    // PEFT: `use_w2 = not (r < max(out_k, in_n) / 2)`; the same as `>=` for finite values.
    let use_w2 = r >= f64::from(out_k.max(in_n)) / 2.0;
    Layout {
        out: (out_l, out_k),
        inp: (in_m, in_n),
        use_w1,
        use_w2,
    }
}

/// The LoKr recipe for one layer under `config` (see the crate docs for the formula).
pub fn recipe(config: &Config, request: &AdapterRequest) -> PluginResult<AdapterRecipe> {
    request
        .check()
        .map_err(|e| PluginError::Invalid(format!("{NAME}: {e}")))?;
    let lay = layout(
        config,
        request.in_features,
        request.out_features,
        request.rank,
    );
    let kaiming = Init::KaimingUniform { a: 5f32.sqrt() };
    let zeros = Init::Zeros;
    let (peft, lycoris) = (
        config.init_weights == LokrInit::Peft,
        config.init_weights == LokrInit::Lycoris,
    );
    let pick = |zero: bool| if zero { zeros.clone() } else { kaiming.clone() };
    let fixed = Dim::Fixed;

    let mut params = Vec::new();
    let mut graph = Vec::new();
    let param = |name: &str, shape: Vec<Dim>, init: Init| ParamSpec {
        name: name.into(),
        shape,
        init,
        trainable: true,
    };
    // w1 [out_l, in_m]
    if lay.use_w1 {
        params.push(param(
            "lokr_w1",
            vec![fixed(lay.out.0), fixed(lay.inp.0)],
            pick(peft),
        ));
        graph.push(Op::Param("lokr_w1".into()));
    } else {
        params.push(param(
            "lokr_w1_a",
            vec![fixed(lay.out.0), Dim::Rank],
            pick(peft),
        ));
        params.push(param(
            "lokr_w1_b",
            vec![Dim::Rank, fixed(lay.inp.0)],
            kaiming.clone(),
        ));
        graph.push(Op::Param("lokr_w1_a".into()));
        graph.push(Op::Param("lokr_w1_b".into()));
        graph.push(Op::Matmul(0, 1));
    }
    let w1 = graph.len() as u32 - 1;
    // w2 [out_k, in_n]
    if lay.use_w2 {
        params.push(param(
            "lokr_w2",
            vec![fixed(lay.out.1), fixed(lay.inp.1)],
            pick(lycoris),
        ));
        graph.push(Op::Param("lokr_w2".into()));
    } else {
        params.push(param(
            "lokr_w2_a",
            vec![fixed(lay.out.1), Dim::Rank],
            kaiming.clone(),
        ));
        params.push(param(
            "lokr_w2_b",
            vec![Dim::Rank, fixed(lay.inp.1)],
            pick(lycoris),
        ));
        let first = graph.len() as u32;
        graph.push(Op::Param("lokr_w2_a".into()));
        graph.push(Op::Param("lokr_w2_b".into()));
        graph.push(Op::Matmul(first, first + 1));
    }
    let w2 = graph.len() as u32 - 1;
    graph.push(Op::Kron(w1, w2));
    graph.push(Op::AlphaOverRank(graph.len() as u32 - 1));
    let export = params
        .iter()
        .map(|p| ExportKey {
            param: p.name.clone(),
            suffix: p.name.clone(),
        })
        .collect();
    Ok(AdapterRecipe {
        params,
        output: graph.len() as u32 - 1,
        graph,
        output_kind: AdapterOutput::WeightDelta,
        export,
        peft_type: "LOKR".into(),
    })
}

/// The `lokr` plugin.
#[derive(Clone, Debug, Default)]
pub struct Lokr {
    config: Config,
}

impl Plugin for Lokr {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kinds: vec![PluginKind::Adapter],
            description: "LoKr (PEFT): ΔW = kron(w1, w2) * alpha/r with PEFT's factorization"
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

cogvx_plugin_api::export_plugin!(Lokr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorization_is_pefts() {
        // PEFT's docstring examples.
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        // A dividing factor is kept in front even when it is the larger one (PEFT returns early).
        assert_eq!(factorization(128, 32), (32, 4));
        // A non-dividing factor bounds the walk: divisors of 360 up to 7 -> 6 (pair (6, 60)).
        assert_eq!(factorization(360, 7), (6, 60));
        assert_eq!(factorization(360, -1), (18, 20));
        assert_eq!(factorization(12, -1), (3, 4));
        assert_eq!(factorization(1, -1), (1, 1));
        assert_eq!(factorization(3072, -1), (48, 64));
        for d in 1..200u32 {
            for f in [-1i64, 1, 2, 3, 4, 8, 16, 1000] {
                let (m, n) = factorization(d, f);
                assert_eq!(m * n, d, "factorization({d}, {f})");
            }
        }
    }

    #[test]
    fn layout_follows_pefts_rank_rule() {
        let c = Config::default();
        // 1920 = 40 * 48; r = 4 < 48 / 2: w2 decomposed; w1 full without decompose_both.
        let l = layout(&c, 1920, 1920, 4);
        assert_eq!(
            (l.out, l.inp, l.use_w1, l.use_w2),
            ((40, 48), (40, 48), true, false)
        );
        // r = 24 = 48 / 2 is not smaller: w2 full.
        assert!(layout(&c, 1920, 1920, 24).use_w2);
        let both = Config {
            decompose_both: true,
            ..Config::default()
        };
        assert!(!layout(&both, 1920, 1920, 4).use_w1);
        assert!(layout(&both, 1920, 1920, 20).use_w1);
    }
}
