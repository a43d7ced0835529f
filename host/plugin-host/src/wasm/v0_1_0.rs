//! The host side of the WIT package `cogvx:plugin@0.1.0`: wasmtime's bindings of its `plugin`
//! world, and the conversions between its types and plugin-api's.

use cogvx_plugin_api::*;

wasmtime::component::bindgen!({
    path: "../../plugin-api/wit/v0.1.0",
    world: "plugin",
});

use cogvx::plugin::types as w;

impl From<w::PluginError> for PluginError {
    fn from(e: w::PluginError) -> Self {
        match e {
            w::PluginError::Unsupported(m) => PluginError::Unsupported(m),
            w::PluginError::Invalid(m) => PluginError::Invalid(m),
            w::PluginError::Failed(m) => PluginError::Failed(m),
        }
    }
}

impl From<w::PluginInfo> for PluginInfo {
    fn from(i: w::PluginInfo) -> Self {
        PluginInfo {
            name: i.name,
            version: i.version,
            kinds: i
                .kinds
                .into_iter()
                .map(|k| match k {
                    w::PluginKind::DatasetReader => PluginKind::DatasetReader,
                    w::PluginKind::VideoTransform => PluginKind::VideoTransform,
                    w::PluginKind::PromptRewriter => PluginKind::PromptRewriter,
                    w::PluginKind::Adapter => PluginKind::Adapter,
                    w::PluginKind::Scheduler => PluginKind::Scheduler,
                    w::PluginKind::Validator => PluginKind::Validator,
                })
                .collect(),
            description: i.description,
        }
    }
}

impl From<TransformRequest> for w::TransformRequest {
    fn from(r: TransformRequest) -> Self {
        w::TransformRequest {
            clip: w::ClipInfo {
                width: r.clip.width,
                height: r.clip.height,
                frame_count: r.clip.frame_count,
                fps: r.clip.fps,
            },
            target: w::Resolution {
                frames: r.target.frames,
                height: r.target.height,
                width: r.target.width,
            },
            plan: r.plan.into(),
            seed: r.seed,
        }
    }
}

impl From<TransformPlan> for w::TransformPlan {
    fn from(p: TransformPlan) -> Self {
        w::TransformPlan {
            frames: p.frames,
            crop: p.crop.map(|c| w::CropBox {
                x: c.x,
                y: c.y,
                width: c.width,
                height: c.height,
            }),
            resize: p.resize.map(|s| w::Size {
                width: s.width,
                height: s.height,
            }),
            filter: match p.filter {
                ResizeFilter::Nearest => w::ResizeFilter::Nearest,
                ResizeFilter::Bilinear => w::ResizeFilter::Bilinear,
                ResizeFilter::Bicubic => w::ResizeFilter::Bicubic,
                ResizeFilter::Lanczos3 => w::ResizeFilter::Lanczos3,
            },
        }
    }
}

impl From<w::TransformPlan> for TransformPlan {
    fn from(p: w::TransformPlan) -> Self {
        TransformPlan {
            frames: p.frames,
            crop: p.crop.map(|c| CropBox {
                x: c.x,
                y: c.y,
                width: c.width,
                height: c.height,
            }),
            resize: p.resize.map(|s| Size {
                width: s.width,
                height: s.height,
            }),
            filter: match p.filter {
                w::ResizeFilter::Nearest => ResizeFilter::Nearest,
                w::ResizeFilter::Bilinear => ResizeFilter::Bilinear,
                w::ResizeFilter::Bicubic => ResizeFilter::Bicubic,
                w::ResizeFilter::Lanczos3 => ResizeFilter::Lanczos3,
            },
        }
    }
}

impl From<Frames> for w::Frames {
    fn from(f: Frames) -> Self {
        w::Frames {
            width: f.width,
            height: f.height,
            count: f.count,
            rgb: f.rgb,
        }
    }
}

impl From<w::Frames> for Frames {
    fn from(f: w::Frames) -> Self {
        Frames {
            width: f.width,
            height: f.height,
            count: f.count,
            rgb: f.rgb,
        }
    }
}

impl From<w::SchedulerTables> for SchedulerTables {
    fn from(t: w::SchedulerTables) -> Self {
        SchedulerTables {
            alphas_cumprod: t.alphas_cumprod,
            timestep_weights: t.timestep_weights,
            loss_weights: t.loss_weights,
        }
    }
}

impl From<w::InferencePlan> for InferencePlan {
    fn from(p: w::InferencePlan) -> Self {
        InferencePlan {
            steps: p
                .steps
                .into_iter()
                .map(|s| StepCoefficients {
                    timestep: s.timestep,
                    x0_sample: s.x0_sample,
                    x0_model_output: s.x0_model_output,
                    sample_coef: s.sample_coef,
                    model_output_coef: s.model_output_coef,
                    x0_coef: s.x0_coef,
                    x0_history: s.x0_history,
                    noise_coef: s.noise_coef,
                })
                .collect(),
        }
    }
}
