//! Decode + preprocess throughput of a 1080p clip to 49x480x720 (not a test):
//! `cargo bench -p cogvx-video --bench preprocess [-- CLIP]`.
//!
//! Uses two small in-file plugins (uniform 49-frame selection, centre crop to the target
//! aspect + Lanczos3 resize); `cogvx bench preprocess` runs the same library function,
//! `cogvx_video::bench::preprocess_throughput`, with the built-in, `.so` and `.wasm`
//! first-party plugins.

use cogvx_plugin_api::{
    CropBox, Plugin, PluginInfo, PluginKind, PluginResult, Resolution, Size, TransformPlan,
    TransformRequest,
};
use cogvx_video::bench::{make_bench_clip, preprocess_throughput};

struct Uniform;
impl Plugin for Uniform {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "bench-uniform".into(),
            version: "0".into(),
            kinds: vec![PluginKind::VideoTransform],
            description: String::new(),
        }
    }
    fn plan_transform(&mut self, r: &TransformRequest) -> PluginResult<TransformPlan> {
        let (n, f) = (r.clip.frame_count as u64, r.target.frames as u64);
        let frames = (0..f)
            .map(|j| {
                if f == 1 {
                    0
                } else {
                    (j * (n - 1) / (f - 1)) as u32
                }
            })
            .collect();
        Ok(TransformPlan {
            frames,
            ..r.plan.clone()
        })
    }
}

struct CenterCrop;
impl Plugin for CenterCrop {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: "bench-center-crop".into(),
            version: "0".into(),
            kinds: vec![PluginKind::VideoTransform],
            description: String::new(),
        }
    }
    fn plan_transform(&mut self, r: &TransformRequest) -> PluginResult<TransformPlan> {
        let (w, h) = (r.clip.width as u64, r.clip.height as u64);
        let (tw, th) = (r.target.width as u64, r.target.height as u64);
        let (cw, ch) = if w * th > h * tw {
            (h * tw / th, h)
        } else {
            (w, w * th / tw)
        };
        let crop = CropBox {
            x: ((w - cw) / 2) as u32,
            y: ((h - ch) / 2) as u32,
            width: cw as u32,
            height: ch as u32,
        };
        Ok(TransformPlan {
            crop: Some(crop),
            resize: Some(Size {
                width: r.target.width,
                height: r.target.height,
            }),
            ..r.plan.clone()
        })
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a non-flag argument names a clip to use instead.
    let clip_arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = match clip_arg {
        Some(c) => c.into(),
        None => make_bench_clip(dir.path(), 1920, 1080, 250, 25).expect("making the 1080p clip"),
    };
    let target = Resolution {
        frames: 49,
        height: 480,
        width: 720,
    };
    let (mut a, mut b) = (Uniform, CenterCrop);
    let chain: Vec<&mut dyn Plugin> = vec![&mut a, &mut b];
    match preprocess_throughput(&clip, target, chain, 3) {
        Ok(t) => println!(
            "preprocess {} -> 49x480x720 (in-process plugins): {t}",
            clip.display()
        ),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
