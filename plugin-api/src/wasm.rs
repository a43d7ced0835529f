//! Guest side of the WASM transport (compiled for `wasm32` only): the `cogvx:plugin@0.1.0`
//! bindings and the adapter from the generated `Guest` trait to [`crate::Plugin`].
//! Plugin authors never touch this module; [`crate::export_plugin!`] wires it up.

use std::cell::RefCell;
use std::marker::PhantomData;

use crate::{Plugin, PluginError};

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit/v0.1.0",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_cogvx_plugin_v0_1_0",
        default_bindings_module: "cogvx_plugin_api::__private::wasm::bindings",
        runtime_path: "cogvx_plugin_api::__private::wit_bindgen::rt",
    });
}

use bindings::cogvx::plugin::types as w;
use bindings::exports::cogvx::plugin::guest::Guest;

thread_local! {
    // One component instance holds exactly one plugin; wasm32-wasip2 is single-threaded.
    static INSTANCE: RefCell<Option<Box<dyn Plugin>>> = const { RefCell::new(None) };
}

/// `Guest` implementation for the plugin type `T` (created lazily with `T::default()`).
#[doc(hidden)]
pub struct Export<T>(PhantomData<T>);

fn with<T: Plugin + Default + 'static, R>(f: impl FnOnce(&mut dyn Plugin) -> R) -> R {
    INSTANCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let plugin = slot.get_or_insert_with(|| Box::new(T::default()) as Box<dyn Plugin>);
        f(plugin.as_mut())
    })
}

impl<T: Plugin + Default + 'static> Guest for Export<T> {
    fn info() -> w::PluginInfo {
        with::<T, _>(|p| p.info().into())
    }
    fn configure(params_json: String) -> Result<(), w::PluginError> {
        with::<T, _>(|p| p.configure(&params_json)).map_err(Into::into)
    }
    fn list_samples(root: String) -> Result<Vec<w::Sample>, w::PluginError> {
        with::<T, _>(|p| p.list_samples(&root))
            .map(|v| v.into_iter().map(Into::into).collect())
            .map_err(Into::into)
    }
    fn plan_transform(request: w::TransformRequest) -> Result<w::TransformPlan, w::PluginError> {
        let request: crate::TransformRequest = request.into();
        with::<T, _>(|p| p.plan_transform(&request))
            .map(Into::into)
            .map_err(Into::into)
    }
    fn transform_frames(frames: w::Frames) -> Result<w::Frames, w::PluginError> {
        with::<T, _>(|p| p.transform_frames(frames.into()))
            .map(Into::into)
            .map_err(Into::into)
    }
    fn rewrite_prompt(caption: String) -> Result<String, w::PluginError> {
        with::<T, _>(|p| p.rewrite_prompt(&caption)).map_err(Into::into)
    }
    fn adapter_recipe(request_json: String) -> Result<String, w::PluginError> {
        let request: crate::AdapterRequest = serde_json::from_str(&request_json).map_err(|e| {
            w::PluginError::Invalid(format!("adapter-recipe: bad AdapterRequest JSON: {e}"))
        })?;
        let recipe = with::<T, _>(|p| p.adapter_recipe(&request)).map_err(w::PluginError::from)?;
        serde_json::to_string(&recipe).map_err(|e| {
            w::PluginError::Failed(format!("adapter-recipe: cannot encode recipe: {e}"))
        })
    }
    fn scheduler_tables(config_json: String) -> Result<w::SchedulerTables, w::PluginError> {
        with::<T, _>(|p| p.scheduler_tables(&config_json))
            .map(Into::into)
            .map_err(Into::into)
    }
    fn scheduler_plan(
        request: w::SchedulerPlanRequest,
    ) -> Result<w::InferencePlan, w::PluginError> {
        let request = crate::SchedulerPlanRequest {
            config_json: request.config_json,
            num_inference_steps: request.num_inference_steps,
        };
        with::<T, _>(|p| p.scheduler_plan(&request))
            .map(Into::into)
            .map_err(Into::into)
    }
    fn validate(request: w::ValidateRequest) -> Result<Vec<w::Metric>, w::PluginError> {
        let request = crate::ValidateRequest {
            prompt: request.prompt,
            frames: request.frames.into(),
            fps: request.fps,
        };
        with::<T, _>(|p| p.validate(&request))
            .map(|v| {
                v.into_iter()
                    .map(|m| w::Metric {
                        name: m.name,
                        value: m.value,
                    })
                    .collect()
            })
            .map_err(Into::into)
    }
}

// ------------------------------------------------------------------ conversions

impl From<PluginError> for w::PluginError {
    fn from(e: PluginError) -> Self {
        match e {
            PluginError::Unsupported(m) => w::PluginError::Unsupported(m),
            PluginError::Invalid(m) => w::PluginError::Invalid(m),
            PluginError::Failed(m) => w::PluginError::Failed(m),
        }
    }
}

impl From<crate::PluginKind> for w::PluginKind {
    fn from(k: crate::PluginKind) -> Self {
        use crate::PluginKind as K;
        match k {
            K::DatasetReader => w::PluginKind::DatasetReader,
            K::VideoTransform => w::PluginKind::VideoTransform,
            K::PromptRewriter => w::PluginKind::PromptRewriter,
            K::Adapter => w::PluginKind::Adapter,
            K::Scheduler => w::PluginKind::Scheduler,
            K::Validator => w::PluginKind::Validator,
        }
    }
}

impl From<crate::PluginInfo> for w::PluginInfo {
    fn from(i: crate::PluginInfo) -> Self {
        w::PluginInfo {
            name: i.name,
            version: i.version,
            kinds: i.kinds.into_iter().map(Into::into).collect(),
            description: i.description,
        }
    }
}

impl From<crate::Sample> for w::Sample {
    fn from(s: crate::Sample) -> Self {
        w::Sample {
            caption: s.caption,
            video: s.video,
            image: s.image,
            frames: s.frames.map(|r| w::FrameRange {
                start: r.start,
                end: r.end,
            }),
            origin: s.origin,
        }
    }
}

impl From<w::TransformRequest> for crate::TransformRequest {
    fn from(r: w::TransformRequest) -> Self {
        crate::TransformRequest {
            clip: crate::ClipInfo {
                width: r.clip.width,
                height: r.clip.height,
                frame_count: r.clip.frame_count,
                fps: r.clip.fps,
            },
            target: crate::Resolution {
                frames: r.target.frames,
                height: r.target.height,
                width: r.target.width,
            },
            plan: r.plan.into(),
            seed: r.seed,
        }
    }
}

impl From<w::TransformPlan> for crate::TransformPlan {
    fn from(p: w::TransformPlan) -> Self {
        crate::TransformPlan {
            frames: p.frames,
            crop: p.crop.map(|c| crate::CropBox {
                x: c.x,
                y: c.y,
                width: c.width,
                height: c.height,
            }),
            resize: p.resize.map(|s| crate::Size {
                width: s.width,
                height: s.height,
            }),
            filter: match p.filter {
                w::ResizeFilter::Nearest => crate::ResizeFilter::Nearest,
                w::ResizeFilter::Bilinear => crate::ResizeFilter::Bilinear,
                w::ResizeFilter::Bicubic => crate::ResizeFilter::Bicubic,
                w::ResizeFilter::Lanczos3 => crate::ResizeFilter::Lanczos3,
            },
        }
    }
}

impl From<crate::TransformPlan> for w::TransformPlan {
    fn from(p: crate::TransformPlan) -> Self {
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
                crate::ResizeFilter::Nearest => w::ResizeFilter::Nearest,
                crate::ResizeFilter::Bilinear => w::ResizeFilter::Bilinear,
                crate::ResizeFilter::Bicubic => w::ResizeFilter::Bicubic,
                crate::ResizeFilter::Lanczos3 => w::ResizeFilter::Lanczos3,
            },
        }
    }
}

impl From<w::Frames> for crate::Frames {
    fn from(f: w::Frames) -> Self {
        crate::Frames {
            width: f.width,
            height: f.height,
            count: f.count,
            rgb: f.rgb,
        }
    }
}

impl From<crate::Frames> for w::Frames {
    fn from(f: crate::Frames) -> Self {
        w::Frames {
            width: f.width,
            height: f.height,
            count: f.count,
            rgb: f.rgb,
        }
    }
}

impl From<crate::SchedulerTables> for w::SchedulerTables {
    fn from(t: crate::SchedulerTables) -> Self {
        w::SchedulerTables {
            alphas_cumprod: t.alphas_cumprod,
            timestep_weights: t.timestep_weights,
            loss_weights: t.loss_weights,
        }
    }
}

impl From<crate::InferencePlan> for w::InferencePlan {
    fn from(p: crate::InferencePlan) -> Self {
        w::InferencePlan {
            steps: p
                .steps
                .into_iter()
                .map(|s| w::StepCoefficients {
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
