//! # `video_metrics` — temporal flicker, sharpness and brightness of a video
//!
//! A validator plugin: the trainer decodes each validation video it samples and logs these
//! metrics (as `video_metrics.<name>`) next to the loss, so a run that starts to flicker or to
//! blur shows up in `metrics.jsonl` without watching every video.
//!
//! ## Definitions
//!
//! Every metric works on the luma of each pixel in `[0, 1]` units,
//! `Y = (w_r R + w_g G + w_b B) / 255` with the `luma` parameter's weights
//! (BT.601 `0.299, 0.587, 0.114` by default, or BT.709 `0.2126, 0.7152, 0.0722`). For a clip of
//! `T` frames of `N = width * height` pixels, with `Y_t(p)` the luma of pixel `p` in frame `t`
//! and `μ_t = (1/N) Σ_p Y_t(p)` the mean luma of frame `t`:
//!
//! | metric | formula | range |
//! |---|---|---|
//! | `brightness` | `(1/T) Σ_t μ_t` | `[0, 1]` |
//! | `flicker_mean_luma` | `1/(T-1) Σ_{t≥1} abs(μ_t - μ_{t-1})`: global brightness flicker | `[0, 1]` |
//! | `flicker_pixel` | `1/(T-1) Σ_{t≥1} (1/N) Σ_p abs(Y_t(p) - Y_{t-1}(p))`: per-pixel temporal change (flicker *and* motion) | `[0, 1]` |
//! | `sharpness` | `(1/T) Σ_t Var_p(ΔY_t(p))`, the variance of the Laplacian | `[0, 16]` |
//!
//! `ΔY` is the 4-neighbour Laplacian `Y(x-1,y) + Y(x+1,y) + Y(x,y-1) + Y(x,y+1) - 4 Y(x,y)`
//! with mirrored borders that do not repeat the edge pixel (`x = -1` reads `x = 1`), i.e.
//! OpenCV's `cv2.Laplacian(Y, cv2.CV_64F, ksize=1).var()` (default `BORDER_REFLECT_101`) per
//! frame, on luma in `[0, 1]`: multiply by `255²` for OpenCV's usual 8-bit scale. Its variance is
//! the population variance over the frame (Pech-Pacheco et al. 2000); a blurred frame has a
//! smaller one. The two flicker metrics are left out for a single-frame clip.
//!
//! A static clip has flicker 0; a clip alternating black and white frames has flicker 1 (both
//! kinds). The sums are accumulated in exact integer arithmetic (luma numerators, Laplacians
//! and their squares), so every transport (built-in, `.so`, `.wasm`) gives bit-identical values.
//!
//! ## Configuration (`[plugin.video_metrics]`)
//!
//! ```toml
//! [plugin.video_metrics]
//! luma = "bt601"   # or "bt709"
//! ```
//!
//! Unknown keys are rejected by name.

use cogvx_plugin_api::{
    Frames, Metric, Plugin, PluginError, PluginInfo, PluginKind, PluginResult, ValidateRequest,
};
use serde::Deserialize;

/// The plugin's name (its crate folder); a loaded plugin of this name replaces the built-in.
pub const NAME: &str = "video_metrics";

/// The luma weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Luma {
    /// ITU-R BT.601: `0.299 R + 0.587 G + 0.114 B` (PIL's `convert("L")`, OpenCV's `COLOR_RGB2GRAY`).
    #[default]
    Bt601,
    /// ITU-R BT.709: `0.2126 R + 0.7152 G + 0.0722 B` (HD video).
    Bt709,
}

impl Luma {
    /// Integer weights `(w_r, w_g, w_b)` and their sum `d`: `Y = (w_r R + w_g G + w_b B) / (255 d)`.
    fn weights(self) -> ([u32; 3], u32) {
        match self {
            Luma::Bt601 => ([299, 587, 114], 1000),
            Luma::Bt709 => ([2126, 7152, 722], 10_000),
        }
    }
}

/// The `[plugin.video_metrics]` table.
#[derive(Clone, Debug, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub luma: Luma,
}

/// Parses the `[plugin.video_metrics]` table given as JSON (empty or `null` means all defaults).
pub fn parse_config(params_json: &str) -> PluginResult<Config> {
    cogvx_plugin_api::parse_params(NAME, params_json)
}

/// The metrics of one clip (see the crate docs for the formulas).
#[derive(Clone, Debug, PartialEq)]
pub struct VideoMetrics {
    pub brightness: f64,
    /// `None` for a single frame.
    pub flicker_mean_luma: Option<f64>,
    /// `None` for a single frame.
    pub flicker_pixel: Option<f64>,
    pub sharpness: f64,
}

impl VideoMetrics {
    /// The metrics as the plugin reports them, in a fixed order.
    pub fn to_metrics(&self) -> Vec<Metric> {
        let mut out = vec![Metric {
            name: "brightness".into(),
            value: self.brightness,
        }];
        if let Some(v) = self.flicker_mean_luma {
            out.push(Metric {
                name: "flicker_mean_luma".into(),
                value: v,
            });
        }
        if let Some(v) = self.flicker_pixel {
            out.push(Metric {
                name: "flicker_pixel".into(),
                value: v,
            });
        }
        out.push(Metric {
            name: "sharpness".into(),
            value: self.sharpness,
        });
        out
    }
}

/// Mirror index without repeating the edge (`-1 -> 1`, `n -> n - 2`); `n = 1` maps to 0.
fn reflect101(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        0
    } else if i < 0 {
        (-i) as usize
    } else if i >= n {
        (2 * n - 2 - i) as usize
    } else {
        i as usize
    }
}

/// Luma numerators `w_r R + w_g G + w_b B` of one RGB8 frame.
fn luma_numerators(rgb: &[u8], weights: [u32; 3], out: &mut Vec<u32>) {
    out.clear();
    out.extend(
        rgb.chunks_exact(3).map(|p| {
            weights[0] * p[0] as u32 + weights[1] * p[1] as u32 + weights[2] * p[2] as u32
        }),
    );
}

/// The variance of the Laplacian of one frame of luma numerators, in numerator units squared.
fn laplacian_variance(y: &[u32], width: usize, height: usize) -> f64 {
    let mut sum: i128 = 0;
    let mut sum_sq: u128 = 0;
    for r in 0..height {
        let up = &y[reflect101(r as isize - 1, height) * width..][..width];
        let row = &y[r * width..][..width];
        let down = &y[reflect101(r as isize + 1, height) * width..][..width];
        // |L| <= 4 * 255 * 10000 < 2^24, so L² < 2^48: the squares are summed in an u64 that
        // is moved into the 128-bit total before it could overflow.
        let (mut row_sum, mut row_sq) = (0i64, 0u64);
        for c in 0..width {
            let left = row[reflect101(c as isize - 1, width)] as i64;
            let right = row[reflect101(c as isize + 1, width)] as i64;
            let l = up[c] as i64 + down[c] as i64 + left + right - 4 * row[c] as i64;
            row_sum += l;
            row_sq += (l * l) as u64;
            if row_sq >= 1 << 62 {
                sum_sq += row_sq as u128;
                row_sq = 0;
            }
        }
        sum += row_sum as i128;
        sum_sq += row_sq as u128;
    }
    // n² Var = n Σ L² - (Σ L)², exact in integers.
    let n = (width * height) as u128;
    let scaled = n * sum_sq - (sum.unsigned_abs() * sum.unsigned_abs());
    scaled as f64 / (n as f64 * n as f64)
}

/// Computes the metrics of `frames` (checked with [`Frames::check`]; the message says what is
/// wrong).
pub fn measure(frames: &Frames, luma: Luma) -> Result<VideoMetrics, String> {
    frames.check()?;
    let (weights, d) = luma.weights();
    let (width, height, count) = (
        frames.width as usize,
        frames.height as usize,
        frames.count as usize,
    );
    let n = width * height;
    // One luma unit in numerator units, and per frame (for means over N pixels).
    let scale = 255.0 * d as f64;
    let frame_scale = scale * n as f64;

    let (mut current, mut previous) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut previous_sum: Option<u64> = None;
    let (mut brightness, mut sharpness, mut flicker_mean, mut flicker_pixel) = (0.0, 0.0, 0.0, 0.0);
    for t in 0..count {
        luma_numerators(&frames.rgb[t * n * 3..][..n * 3], weights, &mut current);
        let sum: u64 = current.iter().map(|&v| v as u64).sum();
        brightness += sum as f64 / frame_scale;
        sharpness += laplacian_variance(&current, width, height) / (scale * scale);
        if let Some(prev_sum) = previous_sum {
            flicker_mean += sum.abs_diff(prev_sum) as f64 / frame_scale;
            let diff: u64 = current
                .iter()
                .zip(&previous)
                .map(|(&a, &b): (&u32, &u32)| a.abs_diff(b) as u64)
                .sum();
            flicker_pixel += diff as f64 / frame_scale;
        }
        previous_sum = Some(sum);
        std::mem::swap(&mut current, &mut previous);
    }
    let pairs = (count - 1) as f64;
    Ok(VideoMetrics {
        brightness: brightness / count as f64,
        flicker_mean_luma: (count > 1).then(|| flicker_mean / pairs),
        flicker_pixel: (count > 1).then(|| flicker_pixel / pairs),
        sharpness: sharpness / count as f64,
    })
}

/// The `video_metrics` plugin.
#[derive(Clone, Debug, Default)]
pub struct VideoMetricsPlugin {
    config: Config,
}

impl VideoMetricsPlugin {
    /// A plugin with the given configuration (the built-in default is `Config::default()`).
    pub fn new(config: Config) -> Self {
        VideoMetricsPlugin { config }
    }
}

impl Plugin for VideoMetricsPlugin {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kinds: vec![PluginKind::Validator],
            description: "temporal flicker (mean-luma and per-pixel), sharpness (variance of the Laplacian) and brightness"
                .to_string(),
        }
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        self.config = parse_config(params_json)?;
        Ok(())
    }

    fn validate(&mut self, request: &ValidateRequest) -> PluginResult<Vec<Metric>> {
        let metrics = measure(&request.frames, self.config.luma).map_err(|e| {
            PluginError::Invalid(format!(
                "{NAME}: the video for prompt {:?}: {e}",
                request.prompt
            ))
        })?;
        Ok(metrics.to_metrics())
    }
}

cogvx_plugin_api::export_plugin!(VideoMetricsPlugin);

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(width: u32, height: u32, frames: &[Vec<u8>]) -> Frames {
        Frames {
            width,
            height,
            count: frames.len() as u32,
            rgb: frames.concat(),
        }
    }

    /// A deterministic textured RGB frame.
    fn texture(width: u32, height: u32, seed: u32) -> Vec<u8> {
        (0..width * height * 3)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) >> 13) as u8)
            .collect()
    }

    /// 3x3 box blur with clamped borders, per channel.
    fn box_blur(rgb: &[u8], width: u32, height: u32) -> Vec<u8> {
        let (w, h) = (width as i64, height as i64);
        let mut out = vec![0u8; rgb.len()];
        for y in 0..h {
            for x in 0..w {
                for ch in 0..3 {
                    let mut s = 0u32;
                    for dy in -1..=1 {
                        for dx in -1..=1 {
                            let (xx, yy) = ((x + dx).clamp(0, w - 1), (y + dy).clamp(0, h - 1));
                            s += rgb[((yy * w + xx) * 3 + ch) as usize] as u32;
                        }
                    }
                    out[((y * w + x) * 3 + ch) as usize] = ((s + 4) / 9) as u8;
                }
            }
        }
        out
    }

    #[test]
    fn a_static_clip_has_zero_flicker() {
        let f = texture(24, 16, 1);
        let m = measure(
            &clip(24, 16, &[f.clone(), f.clone(), f.clone(), f]),
            Luma::Bt601,
        )
        .unwrap();
        assert_eq!(m.flicker_mean_luma, Some(0.0));
        assert_eq!(m.flicker_pixel, Some(0.0));
        assert!(m.sharpness > 0.1, "{m:?}");
        assert!(m.brightness > 0.2 && m.brightness < 0.8, "{m:?}");
    }

    #[test]
    fn alternating_black_and_white_has_flicker_one() {
        let (black, white) = (vec![0u8; 8 * 6 * 3], vec![255u8; 8 * 6 * 3]);
        for luma in [Luma::Bt601, Luma::Bt709] {
            let frames = [
                black.clone(),
                white.clone(),
                black.clone(),
                white.clone(),
                black.clone(),
            ];
            let m = measure(&clip(8, 6, &frames), luma).unwrap();
            assert_eq!(m.flicker_mean_luma, Some(1.0));
            assert_eq!(m.flicker_pixel, Some(1.0));
            assert_eq!(m.sharpness, 0.0);
            assert_eq!(m.brightness, 0.4);
        }
    }

    #[test]
    fn flicker_tells_a_global_change_from_motion() {
        // Frame 1 is frame 0 shifted by one pixel: the mean luma barely moves, the pixels do.
        let (w, h) = (32u32, 8u32);
        let stripes: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                if (i % w) % 2 == 0 {
                    [255u8; 3]
                } else {
                    [0u8; 3]
                }
            })
            .collect();
        let shifted: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                if (i % w) % 2 == 1 {
                    [255u8; 3]
                } else {
                    [0u8; 3]
                }
            })
            .collect();
        let m = measure(&clip(w, h, &[stripes, shifted]), Luma::Bt601).unwrap();
        assert_eq!(m.flicker_mean_luma, Some(0.0));
        assert_eq!(m.flicker_pixel, Some(1.0));
    }

    #[test]
    fn known_values_by_hand() {
        // Pure red then pure blue, one pixel: BT.601 luma 0.299 then 0.114.
        let m = measure(
            &clip(1, 1, &[vec![255, 0, 0], vec![0, 0, 255]]),
            Luma::Bt601,
        )
        .unwrap();
        assert!(
            (m.flicker_mean_luma.unwrap() - 0.185).abs() < 1e-15,
            "{m:?}"
        );
        assert!((m.flicker_pixel.unwrap() - 0.185).abs() < 1e-15, "{m:?}");
        assert!(
            (m.brightness - (0.299 + 0.114) / 2.0).abs() < 1e-15,
            "{m:?}"
        );
        let m = measure(&clip(1, 1, &[vec![255, 0, 0]]), Luma::Bt709).unwrap();
        assert!((m.brightness - 0.2126).abs() < 1e-15);

        // A white dot in a black 3x3 frame: with mirrored borders the Laplacian is
        // [0 2 0; 2 -4 2; 0 2 0], mean 4/9, mean square 32/9, variance 32/9 - 16/81 = 272/81.
        let mut dot = vec![0u8; 27];
        dot[12..15].copy_from_slice(&[255, 255, 255]);
        let m = measure(&clip(3, 3, &[dot]), Luma::Bt601).unwrap();
        assert!((m.sharpness - 272.0 / 81.0).abs() < 1e-12, "{m:?}");
        assert_eq!(m.flicker_mean_luma, None);
        assert_eq!(m.flicker_pixel, None);
        // A horizontal ramp has a zero Laplacian inside and mirrored (non-zero) edges.
        let ramp: Vec<u8> = (0..4u8).flat_map(|x| [x * 50; 3]).collect();
        let m = measure(&clip(4, 1, &[ramp]), Luma::Bt601).unwrap();
        // Luma 0, 50, 100, 150 (/255): L = [2*50, 0, 0, -2*50] -> mean 0, var = 2 * 100² / 4.
        assert!(
            (m.sharpness - 5000.0 / 255.0 / 255.0).abs() < 1e-12,
            "{m:?}"
        );
    }

    #[test]
    fn a_blurred_clip_is_less_sharp() {
        let (w, h) = (40u32, 30u32);
        let sharp: Vec<Vec<u8>> = (0..3).map(|s| texture(w, h, s)).collect();
        let blurred: Vec<Vec<u8>> = sharp.iter().map(|f| box_blur(f, w, h)).collect();
        let twice: Vec<Vec<u8>> = blurred.iter().map(|f| box_blur(f, w, h)).collect();
        let s = measure(&clip(w, h, &sharp), Luma::Bt601).unwrap().sharpness;
        let b = measure(&clip(w, h, &blurred), Luma::Bt601)
            .unwrap()
            .sharpness;
        let bb = measure(&clip(w, h, &twice), Luma::Bt601).unwrap().sharpness;
        assert!(
            s > 4.0 * b && b > bb && bb > 0.0,
            "sharp {s}, blurred {b}, blurred twice {bb}"
        );
    }

    #[test]
    fn the_plugin_reports_named_metrics_and_rejects_bad_input() {
        let mut p = VideoMetricsPlugin::default();
        let info = p.info();
        assert_eq!(
            (info.name.as_str(), info.version.as_str()),
            ("video_metrics", "0.1.0")
        );
        assert_eq!(info.kinds, vec![PluginKind::Validator]);
        let frames = clip(4, 2, &[vec![10; 24], vec![20; 24]]);
        let got = p
            .validate(&ValidateRequest {
                prompt: "a cat".into(),
                frames,
                fps: 8.0,
            })
            .unwrap();
        let names: Vec<&str> = got.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "brightness",
                "flicker_mean_luma",
                "flicker_pixel",
                "sharpness"
            ]
        );

        let bad = Frames {
            width: 4,
            height: 2,
            count: 2,
            rgb: vec![0; 47],
        };
        let e = p
            .validate(&ValidateRequest {
                prompt: "a cat".into(),
                frames: bad,
                fps: 8.0,
            })
            .unwrap_err();
        assert_eq!(
            e,
            PluginError::Invalid("video_metrics: the video for prompt \"a cat\": 2 frames of 4x2 RGB need 48 bytes, got 47".into())
        );

        p.configure(r#"{"luma":"bt709"}"#).unwrap();
        p.configure("").unwrap();
        let e = p.configure(r#"{"lumma":"bt709"}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `lumma`"), "{e}");
        let e = p.configure(r#"{"luma":"srgb"}"#).unwrap_err().to_string();
        assert!(e.contains("unknown variant `srgb`"), "{e}");
    }
}
