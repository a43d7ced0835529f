//! # `crop_resize` — aspect-preserving crop, then resize
//!
//! A video-transform plugin (plan only). It never stretches: it first crops the largest
//! rectangle of the target's aspect ratio (`width / height` of the target, e.g. 720/480 = 3:2)
//! out of the frame, then asks the host to resize that rectangle to the target size with a
//! proper filter (Lanczos-3 by default). The official CogVideoX finetune resizes straight to
//! 480x720 and so stretches every clip of another aspect; this plugin does not.
//!
//! ## The crop rule
//!
//! The crop is taken inside the *region*: the plan's existing crop if an earlier transform set
//! one, otherwise the whole frame (`clip.width x clip.height`). With the region `rw x rh` and the
//! target `W x H`:
//!
//! * region wider than the target (`rw * H > rh * W`): keep the full height, width
//!   `round(rh * W / H)` (halves up);
//! * otherwise: keep the full width, height `round(rw * H / W)` (halves up);
//!
//! so the crop's aspect is the target's within one pixel, and the crop lies inside the region.
//! Its position (`crop`):
//!
//! * **`"center"`** (default): offset `floor((rw - cw) / 2)`, `floor((rh - ch) / 2)`;
//! * **`"random"`**: a uniform offset in `0..=rw - cw` (and `0..=rh - ch`) drawn from a
//!   splitmix64 stream seeded by the request's per-sample seed and the `seed` parameter, so the
//!   same sample, seed and config always give the same crop (on every transport).
//!
//! The plan's `resize` becomes the target size (or the `width`/`height` parameters) and its
//! `filter` the `filter` parameter; any earlier resize is replaced, the frame list is kept.
//!
//! ## Configuration (`[plugin.crop_resize]`)
//!
//! ```toml
//! [plugin.crop_resize]
//! crop = "center"     # or "random"
//! seed = 0            # mixed with the per-sample seed for crop = "random"
//! filter = "lanczos3" # "nearest", "bilinear", "bicubic" or "lanczos3"
//! # width = 720       # output size; both or neither, default: the target resolution
//! # height = 480
//! ```
//!
//! Unknown keys are rejected by name.

use cogvx_plugin_api::{
    CropBox, Plugin, PluginError, PluginInfo, PluginKind, PluginResult, ResizeFilter, Size,
    TransformPlan, TransformRequest,
};
use serde::Deserialize;

/// The plugin's name (its crate folder); a loaded plugin of this name replaces the built-in.
pub const NAME: &str = "crop_resize";

/// Where the crop sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CropMode {
    /// Centred in the region.
    #[default]
    Center,
    /// A seeded, deterministic uniform position.
    Random,
}

/// The `[plugin.crop_resize]` table.
#[derive(Clone, Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub crop: CropMode,
    /// Mixed with the request's per-sample seed for `crop = "random"`.
    pub seed: u64,
    pub filter: ResizeFilter,
    /// Output width; default the target's.
    pub width: Option<u32>,
    /// Output height; default the target's.
    pub height: Option<u32>,
}

/// The `crop_resize` plugin.
#[derive(Clone, Debug, Default)]
pub struct CropResize {
    config: Config,
}

impl CropResize {
    /// A plugin with the given configuration (the built-in default is `Config::default()`).
    pub fn new(config: Config) -> Self {
        CropResize { config }
    }
}

fn invalid(msg: String) -> PluginError {
    PluginError::Invalid(format!("{NAME}: {msg}"))
}

/// Parses the `[plugin.crop_resize]` table given as JSON (empty or `null` means all defaults).
pub fn parse_config(params_json: &str) -> PluginResult<Config> {
    let config: Config = cogvx_plugin_api::parse_params(NAME, params_json)?;
    match (config.width, config.height) {
        (Some(0), _) | (_, Some(0)) => {
            return Err(invalid(format!(
                "[plugin.{NAME}] width and height must be positive"
            )));
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(invalid(format!(
                "[plugin.{NAME}] sets only one of width and height; set both or neither (neither = the target resolution)"
            )));
        }
        _ => {}
    }
    Ok(config)
}

/// One step of splitmix64 (Steele, Lea, Flood 2014): advances `state` and returns 64 mixed bits.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform integer in `0..=max` (Lemire's multiply-shift; bias below 2^-32 for frame sizes).
fn below_or_equal(state: &mut u64, max: u32) -> u32 {
    ((u128::from(splitmix64(state)) * (u128::from(max) + 1)) >> 64) as u32
}

/// `round(a * b / c)` with halves up, in integer arithmetic (`c > 0`).
fn mul_div_round(a: u32, b: u32, c: u32) -> u64 {
    (2 * u64::from(a) * u64::from(b) + u64::from(c)) / (2 * u64::from(c))
}

/// The size `(cw, ch)` of the largest crop of aspect `out_w / out_h` inside a `rw x rh` region,
/// per the rule in the crate docs. All inputs positive; the result is at least 1x1 and at most
/// `rw x rh`.
pub fn crop_size(rw: u32, rh: u32, out_w: u32, out_h: u32) -> (u32, u32) {
    if u64::from(rw) * u64::from(out_h) > u64::from(rh) * u64::from(out_w) {
        let cw = mul_div_round(rh, out_w, out_h).clamp(1, u64::from(rw)) as u32;
        (cw, rh)
    } else {
        let ch = mul_div_round(rw, out_h, out_w).clamp(1, u64::from(rh)) as u32;
        (rw, ch)
    }
}

impl CropResize {
    /// The crop box (in source pixels) for a region and output size.
    pub fn crop_box(&self, region: CropBox, out: Size, seed: u64) -> CropBox {
        let (cw, ch) = crop_size(region.width, region.height, out.width, out.height);
        let (sx, sy) = (region.width - cw, region.height - ch);
        let (dx, dy) = match self.config.crop {
            CropMode::Center => (sx / 2, sy / 2),
            CropMode::Random => {
                // Two independent streams mixed into one seed: the sample's and the config's.
                let mut state = seed ^ splitmix64(&mut { self.config.seed });
                (
                    below_or_equal(&mut state, sx),
                    below_or_equal(&mut state, sy),
                )
            }
        };
        CropBox {
            x: region.x + dx,
            y: region.y + dy,
            width: cw,
            height: ch,
        }
    }
}

impl Plugin for CropResize {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kinds: vec![PluginKind::VideoTransform],
            description: "crops to the target aspect (center or seeded random), then resizes; never stretches".to_string(),
        }
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        self.config = parse_config(params_json)?;
        Ok(())
    }

    fn plan_transform(&mut self, request: &TransformRequest) -> PluginResult<TransformPlan> {
        let clip = &request.clip;
        let out = match (self.config.width, self.config.height) {
            (Some(width), Some(height)) => Size { width, height },
            _ => Size {
                width: request.target.width,
                height: request.target.height,
            },
        };
        if out.width == 0 || out.height == 0 {
            return Err(invalid(format!(
                "the target size {}x{} (HxW) is empty",
                out.height, out.width
            )));
        }
        if clip.width == 0 || clip.height == 0 {
            return Err(invalid(format!(
                "the clip's frames are {}x{} (WxH), nothing to crop",
                clip.width, clip.height
            )));
        }
        let region = request.plan.crop.unwrap_or(CropBox {
            x: 0,
            y: 0,
            width: clip.width,
            height: clip.height,
        });
        let inside = region.width > 0
            && region.height > 0
            && u64::from(region.x) + u64::from(region.width) <= u64::from(clip.width)
            && u64::from(region.y) + u64::from(region.height) <= u64::from(clip.height);
        if !inside {
            return Err(invalid(format!(
                "the incoming plan's crop {}x{}+{}+{} (WxH+x+y) is not inside the {}x{} frame (an earlier transform is wrong)",
                region.width, region.height, region.x, region.y, clip.width, clip.height
            )));
        }
        let mut plan = request.plan.clone();
        plan.crop = Some(self.crop_box(region, out, request.seed));
        plan.resize = Some(out);
        plan.filter = self.config.filter;
        Ok(plan)
    }
}

cogvx_plugin_api::export_plugin!(CropResize);

#[cfg(test)]
mod tests {
    use super::*;
    use cogvx_plugin_api::{ClipInfo, Resolution};

    fn request(width: u32, height: u32, seed: u64) -> TransformRequest {
        let clip = ClipInfo {
            width,
            height,
            frame_count: 5,
            fps: 24.0,
        };
        TransformRequest {
            clip,
            target: Resolution {
                frames: 49,
                height: 480,
                width: 720,
            },
            plan: TransformPlan::identity(&clip),
            seed,
        }
    }

    fn plugin(json: &str) -> CropResize {
        let mut p = CropResize::default();
        p.configure(json).unwrap();
        p
    }

    /// The crop has the 720:480 aspect within one pixel and lies inside the frame.
    fn assert_good_crop(c: CropBox, fw: u32, fh: u32) {
        assert!(c.width > 0 && c.height > 0, "{c:?}");
        assert!(
            c.x + c.width <= fw && c.y + c.height <= fh,
            "{c:?} outside {fw}x{fh}"
        );
        // Ideal height for this width is width * 480 / 720; allow 1 px (and likewise width).
        let ideal_h = f64::from(c.width) * 480.0 / 720.0;
        let ideal_w = f64::from(c.height) * 720.0 / 480.0;
        assert!(
            (f64::from(c.height) - ideal_h).abs() <= 1.0
                || (f64::from(c.width) - ideal_w).abs() <= 1.0,
            "{c:?} is not 3:2"
        );
    }

    #[test]
    fn info_reports_name_version_kind() {
        let info = CropResize::default().info();
        assert_eq!(info.name, "crop_resize");
        assert_eq!(info.version, "0.1.0");
        assert_eq!(info.kinds, vec![PluginKind::VideoTransform]);
    }

    #[test]
    fn center_crop_of_four_aspect_ratios_to_480x720() {
        let mut p = plugin("{}");
        // (frame w, h) -> expected centred crop (x, y, w, h).
        let cases = [
            (
                (176, 144),
                CropBox {
                    x: 0,
                    y: 13,
                    width: 176,
                    height: 117,
                },
            ), // 11:9, 176*2/3 = 117.3
            (
                (640, 272),
                CropBox {
                    x: 116,
                    y: 0,
                    width: 408,
                    height: 272,
                },
            ), // 2.35:1, 272*3/2 = 408
            (
                (320, 240),
                CropBox {
                    x: 0,
                    y: 13,
                    width: 320,
                    height: 213,
                },
            ), // 4:3, 320*2/3 = 213.3
            (
                (256, 256),
                CropBox {
                    x: 0,
                    y: 42,
                    width: 256,
                    height: 171,
                },
            ), // 1:1, 256*2/3 = 170.7
        ];
        for ((w, h), want) in cases {
            let plan = p.plan_transform(&request(w, h, 0)).unwrap();
            let crop = plan.crop.unwrap();
            assert_eq!(crop, want, "{w}x{h}");
            assert_good_crop(crop, w, h);
            assert_eq!(
                plan.resize,
                Some(Size {
                    width: 720,
                    height: 480
                })
            );
            assert_eq!(plan.filter, ResizeFilter::Lanczos3);
            assert_eq!(plan.frames, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn exact_aspect_keeps_whole_frame() {
        let plan = plugin("{}").plan_transform(&request(1440, 960, 3)).unwrap();
        assert_eq!(
            plan.crop,
            Some(CropBox {
                x: 0,
                y: 0,
                width: 1440,
                height: 960
            })
        );
        let plan = plugin(r#"{"crop":"random"}"#)
            .plan_transform(&request(720, 480, 3))
            .unwrap();
        assert_eq!(
            plan.crop,
            Some(CropBox {
                x: 0,
                y: 0,
                width: 720,
                height: 480
            })
        );
    }

    #[test]
    fn random_crop_is_deterministic_inside_and_varies_with_seed() {
        let p = plugin(r#"{"crop":"random","seed":11}"#);
        let mut xs = std::collections::BTreeSet::new();
        for (w, h) in [(176, 144), (640, 272), (320, 240), (256, 256), (1920, 1080)] {
            for seed in 0..50u64 {
                let a = p
                    .clone()
                    .plan_transform(&request(w, h, seed))
                    .unwrap()
                    .crop
                    .unwrap();
                let b = p
                    .clone()
                    .plan_transform(&request(w, h, seed))
                    .unwrap()
                    .crop
                    .unwrap();
                assert_eq!(a, b, "same seed, same crop");
                assert_good_crop(a, w, h);
                if (w, h) == (640, 272) {
                    assert_eq!(a.y, 0);
                    xs.insert(a.x);
                }
            }
        }
        // 50 seeds over 233 possible offsets: a working PRNG gives many distinct ones.
        assert!(xs.len() > 30, "only {} distinct offsets: {xs:?}", xs.len());
        // The config seed changes the stream too.
        let q = plugin(r#"{"crop":"random","seed":12}"#);
        let differ = (0..20u64)
            .filter(|&s| {
                p.clone()
                    .plan_transform(&request(640, 272, s))
                    .unwrap()
                    .crop
                    != q.clone()
                        .plan_transform(&request(640, 272, s))
                        .unwrap()
                        .crop
            })
            .count();
        assert!(
            differ >= 15,
            "config seed barely matters: {differ}/20 differ"
        );
    }

    #[test]
    fn splitmix64_matches_reference_values() {
        // First outputs for seed 1234567 (Rosetta Code "Pseudo-random numbers/Splitmix64").
        let mut s = 1234567u64;
        assert_eq!(splitmix64(&mut s), 6457827717110365317);
        assert_eq!(splitmix64(&mut s), 3203168211198807973);
    }

    #[test]
    fn composes_inside_existing_crop() {
        let mut req = request(1920, 1080, 5);
        req.plan.crop = Some(CropBox {
            x: 100,
            y: 50,
            width: 800,
            height: 800,
        });
        req.plan.resize = Some(Size {
            width: 64,
            height: 64,
        });
        req.plan.frames = vec![3, 1];
        let plan = plugin("{}").plan_transform(&req).unwrap();
        // 800x800 -> full width, height round(800 * 2/3) = 533, centred: y = 50 + 133.
        assert_eq!(
            plan.crop,
            Some(CropBox {
                x: 100,
                y: 183,
                width: 800,
                height: 533
            })
        );
        assert_eq!(
            plan.resize,
            Some(Size {
                width: 720,
                height: 480
            })
        );
        assert_eq!(plan.frames, vec![3, 1]);
        let plan = plugin(r#"{"crop":"random"}"#).plan_transform(&req).unwrap();
        let c = plan.crop.unwrap();
        assert!(
            c.x == 100 && c.y >= 50 && c.y + c.height <= 850 && c.height == 533,
            "{c:?}"
        );
    }

    #[test]
    fn params_override_size_and_filter() {
        let plan = plugin(r#"{"width":256,"height":256,"filter":"bicubic"}"#)
            .plan_transform(&request(640, 272, 0))
            .unwrap();
        assert_eq!(
            plan.crop,
            Some(CropBox {
                x: 184,
                y: 0,
                width: 272,
                height: 272
            })
        );
        assert_eq!(
            plan.resize,
            Some(Size {
                width: 256,
                height: 256
            })
        );
        assert_eq!(plan.filter, ResizeFilter::Bicubic);
    }

    #[test]
    fn rejects_bad_config_by_name() {
        let mut p = CropResize::default();
        let e = p
            .configure(r#"{"crop":"center","mode":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `mode`") && e.contains("[plugin.crop_resize]"),
            "{e}"
        );
        let e = p
            .configure(r#"{"filter":"lanczos5"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `lanczos5`"), "{e}");
        let e = p.configure(r#"{"width":720}"#).unwrap_err().to_string();
        assert!(e.contains("only one of width and height"), "{e}");
        let e = p
            .configure(r#"{"width":0,"height":4}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be positive"), "{e}");
    }

    #[test]
    fn rejects_bad_requests() {
        let mut p = plugin("{}");
        let e = p
            .plan_transform(&request(0, 10, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("crop_resize") && e.contains("0x10"), "{e}");
        let mut req = request(100, 100, 0);
        req.plan.crop = Some(CropBox {
            x: 50,
            y: 0,
            width: 60,
            height: 10,
        });
        let e = p.plan_transform(&req).unwrap_err().to_string();
        assert!(e.contains("not inside the 100x100 frame"), "{e}");
        let mut req = request(100, 100, 0);
        req.target.width = 0;
        let e = p.plan_transform(&req).unwrap_err().to_string();
        assert!(e.contains("target size 480x0"), "{e}");
    }

    #[test]
    fn extreme_aspects_never_panic() {
        let mut p = plugin(r#"{"crop":"random"}"#);
        for (w, h) in [(1, 1), (1, 5000), (5000, 1), (u32::MAX, 1), (3, 2)] {
            let c = p.plan_transform(&request(w, h, 9)).unwrap().crop.unwrap();
            assert!(
                c.width >= 1 && c.height >= 1 && c.x as u64 + c.width as u64 <= w as u64,
                "{c:?}"
            );
            assert!(c.y as u64 + c.height as u64 <= h as u64, "{c:?}");
        }
    }
}
