//! One training run as a value ([`Run`]): [`Run::set_up`] checks the job and loads the model,
//! its adapter and (when resuming) a checkpoint; [`Run::train_step`] makes one optimizer update;
//! [`Run::checkpoint`] and [`Run::validate`] write a checkpoint and validation videos;
//! [`Run::finish`] writes the last checkpoint, validates and exports. [`crate::train`] drives it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::FloatDType;
use cogvx_cache::Cache;
use cogvx_metrics::{MetricsLog, StepRecord, TensorBoardLog, TrainProgress};
use cogvx_model_core::adapter::AdapterTensor;
use cogvx_model_core::precision::{LossScaler, MixedPrecision};
use cogvx_model_core::ModelAutodiffBackend;
use cogvx_plugin_api::Plugin;
use cogvx_train::{AdamW, AdapterSpec, InnerTensors, TrainMode};
use cogvx_transformer::{CogVideoXTransformer3DModel, TransformerConfig};

use crate::batch::{
    make_micro_batch, train_schedule, BatchSource, CaptionDropout, ImageEncoder, TrainSchedule,
};
use crate::dist::{all_reduce_step, check_same_job, GradLayout};
use crate::validation::Validation;
use crate::zero::{self, ShardOptimizer, Sharding, Zero};
use crate::{
    batches_per_epoch, check_output_dir, checkpoint, epoch_batches, epoch_order, input,
    list_checkpoints, lock, read_checkpoint, write_checkpoint, Checkpoint, DataPosition,
    LrSchedule, Resume, TrainConfig, TrainJob, TrainRng, TrainSummary, TrainerError, TrainerState,
    ValidationConfig, LOSS_PLOT_FILE, METRICS_FILE, TENSORBOARD_DIR,
};

/// One training run: the job's checks, the model with its adapter, the plan (steps, schedule)
/// and the state a checkpoint saves (optimizer, RNG, data position).
pub(crate) struct Run<'a, B: ModelAutodiffBackend> {
    device: B::Device,
    /// The processes of the run; rank 0 writes the output folder.
    pub(crate) world: &'a dyn cogvx_dist::Collective,
    rank: usize,
    ws: usize,
    pub(crate) config: TrainConfig,
    pub(crate) vconfig: ValidationConfig,
    out: PathBuf,
    /// Rank 0's lock of the output folder.
    _lock: Option<lock::OutputLock>,
    cache: Cache,
    folder_transformer: PathBuf,
    tc: TransformerConfig,
    model: CogVideoXTransformer3DModel<B>,
    mode: TrainMode,
    spec: AdapterSpec,
    adapter_params: serde_json::Value,
    tschedule: TrainSchedule,
    image_encoder: Option<ImageEncoder<B::InnerBackend>>,
    caption_dropout: Option<CaptionDropout>,
    /// Rank 0's validation.
    validation: Option<Validation<B::InnerBackend>>,
    validators: Vec<(String, &'a mut dyn Plugin)>,
    scheduler_plugin: Option<&'a mut dyn Plugin>,
    on_checkpoint_file: Option<&'a dyn Fn(&Path)>,
    run_config: Option<serde_json::Value>,
    // The plan.
    n: usize,
    bs: usize,
    k: u64,
    batches_per_epoch: u64,
    pub(crate) total_steps: u64,
    lr_schedule: LrSchedule,
    // The state a checkpoint saves.
    optimizer: AdamW<B::InnerBackend>,
    /// ZeRO-2 or optimizer offload: this rank's optimizer (then `optimizer` stays empty).
    zero: Option<Zero<B::InnerBackend>>,
    pub(crate) step: u64,
    pos: DataPosition,
    elapsed_s: f64,
    last_lr: f64,
    scaler: Option<LossScaler>,
    /// Resumed with another world size at some point (see [`TrainerState::resized`]).
    resized: bool,
    // Bookkeeping.
    /// The trainable tensors as the gradient all-reduce lays them out.
    grad_layout: GradLayout,
    /// Each cache sample's bucket (an index into the distinct resolutions of the cache).
    bucket_of: Vec<usize>,
    /// The epoch's sample order and its micro-batches (positions in the order).
    order: Vec<usize>,
    batches: Vec<Vec<usize>>,
    order_epoch: u64,
    /// Rank 0's metrics.
    metrics: Option<MetricsLog>,
    bar: TrainProgress,
    pub(crate) summary: TrainSummary,
    last_saved: Option<u64>,
    last_validated: Option<u64>,
}

impl<'a, B: ModelAutodiffBackend> Run<'a, B> {
    /// Checks the job before any work, loads the model and its adapter, plans the run and
    /// restores a checkpoint when asked to resume.
    pub(crate) fn set_up(job: TrainJob<'a>, device: &B::Device) -> Result<Self, TrainerError> {
        let TrainJob {
            model_dir,
            cache,
            config,
            validation: vconfig,
            adapter_plugin,
            adapter_params,
            recipe_limits,
            mut scheduler_plugin,
            mut validators,
            resume,
            run_config,
            progress,
            on_step: _,
            on_checkpoint_file,
            collective: world,
        } = job;
        let (rank, ws) = (world.rank(), world.world_size());

        // ---- checks before any work
        config.validate()?;
        vconfig.validate()?;
        // Every rank must run the same job (a rank with another config would train something else).
        let job_json = serde_json::to_vec(&(
            &config,
            &vconfig,
            &run_config,
            &model_dir,
            cache.len(),
            &cache.index.buckets,
        ))
        .map_err(|e| TrainerError::Input(format!("the job does not serialise: {e}")))?;
        check_same_job(world, &job_json)?;
        let out = config.output_dir.clone();
        // Rank 0 owns the output folder.
        let lock = if rank == 0 {
            check_output_dir(&out, &[("[model] path", &model_dir)])?;
            Some(lock::OutputLock::acquire(&out)?)
        } else {
            None
        };
        if cache.is_empty() {
            return input(format!(
                "the cache {} holds no samples; run `cogvx prepare` on a dataset with videos",
                cache.dir.display()
            ));
        }
        let folder = cogvx_engine::ModelFolder::open(&model_dir)?;
        let i2v = folder.variant.is_i2v();
        if i2v != cache.index.i2v {
            return input(format!(
                "the model {} is {} ({}), but the cache {} was prepared for {}; prepare it for this model",
                model_dir.display(),
                if i2v { "image-to-video" } else { "text-to-video" },
                folder.variant,
                cache.dir.display(),
                if cache.index.i2v { "image-to-video" } else { "text-to-video" },
            ));
        }
        if vconfig.enabled() && i2v && vconfig.images.is_empty() {
            return Err(TrainerError::Config("`validation.images`: an image-to-video model needs one conditioning image per validation prompt".into()));
        }
        if vconfig.enabled() && !i2v && !vconfig.images.is_empty() {
            return Err(TrainerError::Config(
                "`validation.images`: given for a text-to-video model; remove them".into(),
            ));
        }
        let mut validator_refs: Vec<(String, &'a mut dyn Plugin)> = Vec::new();
        for name in &vconfig.validators {
            let pos = validators
                .iter()
                .position(|p| &p.info().name == name)
                .ok_or_else(|| {
                    TrainerError::Config(format!(
                        "`validation.validators`: no validator plugin named `{name}` was loaded"
                    ))
                })?;
            validator_refs.push((name.clone(), validators.remove(pos)));
        }
        let tc = folder.transformer_config.clone();
        let first = cache.get(0)?;
        let c = first.latent.shape[0];
        let want_in = if i2v { 2 * c } else { c };
        if tc.in_channels != want_in {
            return input(format!(
                "the cache's latents have {c} channels, the transformer of {} takes {} ({}); prepare the cache with this model's VAE",
                model_dir.display(),
                tc.in_channels,
                if i2v { "twice the latent channels for I2V" } else { "the latent channels" }
            ));
        }
        if first.prompt_embedding.shape[1] != tc.text_embed_dim {
            return input(format!(
                "the cache's prompt embeddings have width {}, the transformer takes {}; prepare the cache with this model's text encoder",
                first.prompt_embedding.shape[1], tc.text_embed_dim
            ));
        }

        // Mixed precision needs the half dtype (and bf16, which T5 runs in) on this backend.
        let text_dtype = config.mixed_precision.text_encoder_dtype();
        for dtype in std::iter::once(config.mixed_precision.dtype()).chain(text_dtype) {
            if !B::supports_dtype(device, dtype.into()) {
                return Err(TrainerError::Config(format!(
                    "`mixed_precision` = \"{}\": the {} backend has no {:?} tensors; use \"no\", or the flex backend on the CPU (as `cogvx train` does) or CUDA",
                    config.mixed_precision.name(),
                    B::name(device),
                    dtype
                )));
            }
        }

        // Validation's prompt embeddings, T5-encoded now (or read from the cache) so that T5 is
        // never resident beside the model being trained. Rank 0 validates.
        let validation = if rank == 0 {
            Some(Validation::<B::InnerBackend>::new(
                folder.clone(),
                &out,
                &cache,
                &vconfig,
                text_dtype,
                device,
            )?)
        } else {
            None
        };
        // Caption dropout's empty prompt, cached like the validation prompts: rank 0 encodes and
        // caches it, then the others read it.
        if config.caption_dropout > 0.0 && rank != 0 {
            world.barrier();
        }
        let caption_dropout = if config.caption_dropout > 0.0 {
            let empty = cogvx_cache::prompt_embeddings::<B::InnerBackend>(
                &cache.dir,
                &model_dir,
                &[String::new()],
                cache.index.max_sequence_length,
                text_dtype,
                device,
            )?
            .remove(0);
            if empty.shape != first.prompt_embedding.shape {
                return input(format!(
                    "caption_dropout: the empty prompt encodes to {:?}, the cache's captions are {:?}; prepare the cache with this model's text encoder",
                    empty.shape, first.prompt_embedding.shape
                ));
            }
            Some(CaptionDropout {
                p: config.caption_dropout,
                empty,
            })
        } else {
            None
        };
        if config.caption_dropout > 0.0 && rank == 0 {
            world.barrier();
        }

        // ---- model and adapter
        // Mixed precision: frozen weights are loaded in the half dtype; SFT keeps f32 master
        // weights and computes in half (autocast).
        let precision = config.mixed_precision;
        // SFT in half precision with ZeRO-2 or optimizer offload (DeepSpeed's layout): the model
        // holds half weights, the optimizer shards keep the f32 masters in host memory.
        let half_masters = config.is_sft()
            && precision.is_half()
            && (config.zero_stage == 2 || config.optimizer_offload);
        let load_dtype = if config.is_sft() && !half_masters {
            FloatDType::F32
        } else {
            precision.dtype()
        };
        let mut model = CogVideoXTransformer3DModel::<B>::from_dir_in(
            &folder.component_dir("transformer"),
            load_dtype,
            device,
        )?;
        model.set_compute_dtype(precision.dtype());
        // The adapter initialisation draws from the backend RNG.
        B::seed(device, config.seed);
        let spec = AdapterSpec {
            rank: config.rank,
            alpha: config.alpha,
            targets: config.target_modules.clone(),
        };
        let mode = if config.is_sft() {
            TrainMode::Full
        } else {
            TrainMode::Adapter
        };
        let layers = if config.is_lora() {
            model = cogvx_train::freeze(model);
            cogvx_train::inject_lora(&mut model, &spec, device)?
        } else if config.is_sft() {
            model = cogvx_train::enable_full_training(model);
            Vec::new()
        } else {
            let plugin = adapter_plugin.ok_or_else(|| {
                TrainerError::Config(format!("`adapter` = {:?}: no adapter plugin of that name was loaded (built in: \"lora\", \"sft\")", config.adapter))
            })?;
            let pname = plugin.info().name;
            if pname != config.adapter {
                return Err(TrainerError::Config(format!(
                    "`adapter` = {:?}, but the adapter plugin given is `{pname}`",
                    config.adapter
                )));
            }
            model = cogvx_train::freeze(model);
            cogvx_train::inject_recipe(
                &mut model,
                &spec,
                recipe_limits,
                |req| plugin.adapter_recipe(req),
                device,
            )?
        };
        model.set_gradient_checkpointing(config.gradient_checkpointing);
        model.set_checkpoint_offload(config.gradient_checkpointing_offload);
        model.set_feed_forward_recompute(config.recompute_feed_forward);
        let grad_layout = GradLayout::new(&mode.values(&mut model));
        let n_params = grad_layout.values();
        if config.is_sft() {
            tracing::info!("full fine-tuning: {n_params} trainable parameters");
        } else {
            tracing::info!(
                "{} adapter on {} layers, {n_params} trainable parameters",
                config.adapter,
                layers.len()
            );
        }

        let tschedule = train_schedule(&model_dir, scheduler_plugin.as_deref_mut())?;
        let image_encoder = if i2v {
            Some(ImageEncoder::<B::InnerBackend>::load(&model_dir, device)?)
        } else {
            None
        };

        // ---- the plan of the run
        let n = cache.len();
        let bs = config.batch_size;
        let k = config.gradient_accumulation_steps as u64;
        let (buckets, bucket_of) = bucket_ids(&cache.index);
        if buckets.len() > 1 {
            tracing::info!(
                "{} buckets, one per batch: {}",
                buckets.len(),
                buckets
                    .iter()
                    .enumerate()
                    .map(|(i, [f, h, w])| {
                        let c = bucket_of.iter().filter(|&&b| b == i).count();
                        format!("{f}x{h}x{w}: {c}")
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let batches_per_epoch = batches_per_epoch(&bucket_of, bs);
        if ws as u64 > batches_per_epoch {
            return input(format!(
                "the run has {ws} processes, but an epoch of the cache {} has {batches_per_epoch} micro-batches ({n} samples, batch_size {bs}): \
                 each process needs one per step; use at most {batches_per_epoch} processes or a smaller batch_size",
                cache.dir.display()
            ));
        }
        // A micro-step takes one micro-batch per process; an update `k` micro-steps.
        let updates_per_epoch = batches_per_epoch.div_ceil(ws as u64).div_ceil(k);
        let mut optimizer = AdamW::<B::InnerBackend>::new(config.adamw());
        let mut zero = (config.zero_stage == 2 || config.optimizer_offload).then(|| {
            let across = config.zero_stage == 2;
            let sharding = if across {
                Sharding::new(&grad_layout, ws, rank)
            } else {
                Sharding::new(&grad_layout, 1, 0)
            };
            if across {
                tracing::info!(
                    "ZeRO-2: this process keeps the optimizer states of {} of the {n_params} trainable values{}",
                    sharding.owned_values(),
                    if config.optimizer_offload { ", in host memory" } else { "" }
                );
            } else {
                tracing::info!("optimizer offload: the AdamW states live in host memory and step on the CPU");
            }
            Zero {
                sharding,
                optimizer: ShardOptimizer::new(config.adamw(), config.optimizer_offload, device),
                across,
                masters: None,
            }
        });
        let mut step = 0u64;
        let mut pos = DataPosition { epoch: 0, batch: 0 };
        let mut elapsed_s = 0.0;
        let mut last_lr = 0.0;
        let mut scaler = (precision == MixedPrecision::Fp16).then(|| LossScaler {
            scale: config.fp16_init_scale,
            ..LossScaler::default()
        });

        // ---- resume (rank 0 clears what an interrupted save left before any rank looks)
        if rank == 0 {
            checkpoint::remove_stale_temp_dirs(&out)?;
        }
        world.barrier();
        let mut resized = false;
        let resumed = find_resume_checkpoint(resume, &out)?;
        let resume_dir = resumed.as_ref().map(|(d, _)| d.clone());
        if let Some((dir, ck)) = &resumed {
            check_resumable(&ck.state.config, &config, dir)?;
            check_same_run_config(ck.state.run_config.as_ref(), run_config.as_ref(), dir)?;
            if ck.state.num_samples != n as u64 {
                return input(format!(
                    "cannot resume from {}: it was trained on {} samples, the cache {} has {n}; resume with the same cache",
                    dir.display(),
                    ck.state.num_samples,
                    cache.dir.display()
                ));
            }
            ck.check_resumable(dir, batches_per_epoch, k)?;
            let values = from_host::<B::InnerBackend>(
                &ck.weights,
                device,
                &dir.join(checkpoint::WEIGHTS_FILE),
            )?;
            mode.set_values(&mut model, &values)?;
            match &mut zero {
                Some(z) => z.optimizer.load_owned(&ck.optimizer, &z.sharding)?,
                None => optimizer.load_state(&ck.optimizer, device)?,
            }
            step = ck.state.step;
            pos = ck.state.data;
            elapsed_s = ck.state.elapsed_s;
            last_lr = ck.state.last_lr;
            if scaler.is_some() {
                scaler = Some(ck.state.loss_scaler.clone().unwrap_or_default());
            }
            resized = ck.state.resized || ck.state.world_size != ws as u64;
            tracing::info!(
                "resumed from {} at step {step} (epoch {}, batch {})",
                dir.display(),
                pos.epoch,
                pos.batch
            );
            if ck.state.world_size != ws as u64 {
                tracing::info!(
                    "the checkpoint was trained by {} process(es), this run has {ws}: the data continues at the same sample; a step now takes {} micro-batches",
                    ck.state.world_size,
                    ws as u64 * k
                );
            }
        }
        // Half-precision SFT: this rank's f32 masters, from the checkpoint (which holds them) or
        // from the weights as loaded.
        if let (true, Some(z)) = (half_masters, &mut zero) {
            let masters: BTreeMap<String, Vec<f32>> = match &resumed {
                Some((_, ck)) => ck
                    .weights
                    .iter()
                    .filter(|(k, _)| z.sharding.owns(k))
                    .map(|(k, (_, v))| (k.clone(), v.clone()))
                    .collect(),
                None => z.sharding.owned_on_host(mode.values(&mut model)),
            };
            tracing::info!(
                "{} weights on the device, f32 master weights of this process's {} values in host memory",
                precision.name(),
                masters.values().map(Vec::len).sum::<usize>()
            );
            z.masters = Some(masters);
        }
        // The steps: `max_steps`, or those that finish `epochs` from where the run stands (the
        // same as epochs x updates per epoch, unless the world size changed at a resume).
        let updates_left = if pos.epoch >= config.epochs {
            0
        } else {
            (batches_per_epoch - pos.batch)
                .div_ceil(ws as u64)
                .div_ceil(k)
                + (config.epochs - pos.epoch - 1) * updates_per_epoch
        };
        let total_steps = config.max_steps.unwrap_or(step + updates_left);
        let lr_schedule = LrSchedule {
            kind: config.lr_scheduler,
            num_warmup_steps: config.lr_warmup_steps,
            num_training_steps: total_steps,
            num_cycles: config.lr_num_cycles,
        };
        if step >= total_steps {
            tracing::info!("the run already reached step {step} of {total_steps}");
        }

        let resume_step = resume_dir.as_ref().map(|_| step);
        let metrics = if rank == 0 {
            let mut metrics = MetricsLog::open(&out.join(METRICS_FILE), resume_step)?;
            if config.tensorboard {
                metrics = metrics.with_tensorboard(TensorBoardLog::open(
                    &out.join(TENSORBOARD_DIR),
                    resume_step,
                )?);
            }
            Some(metrics)
        } else {
            None
        };
        let bar = TrainProgress::new(total_steps, step, progress && rank == 0);
        if ws > 1 {
            tracing::info!(
                "data parallel: {ws} processes ({}), {} samples per micro-step",
                world.describe(),
                ws * bs
            );
        }
        tracing::info!(
            "training {total_steps} steps: {n} samples, batch {bs}, accumulation {k}, {updates_per_epoch} steps per epoch, lr {} ({})",
            config.learning_rate,
            config.lr_scheduler.as_str()
        );
        let summary = TrainSummary {
            start_step: step,
            step,
            total_steps,
            resumed_from: resume_dir.clone(),
            losses: Vec::new(),
            last_checkpoint: None,
            exported: None,
            export_reports: Vec::new(),
            validation_videos: Vec::new(),
            stopped_early: false,
            skipped_steps: Vec::new(),
        };
        let order = epoch_order(config.seed, pos.epoch, n);
        Ok(Run {
            device: device.clone(),
            world,
            rank,
            ws,
            batches: epoch_batches(&order, &bucket_of, bs),
            order,
            bucket_of,
            order_epoch: pos.epoch,
            last_saved: resume_dir.as_ref().map(|_| step),
            last_validated: None,
            config,
            vconfig,
            out,
            _lock: lock,
            cache,
            folder_transformer: folder.component_dir("transformer"),
            tc,
            model,
            mode,
            spec,
            adapter_params,
            tschedule,
            image_encoder,
            caption_dropout,
            validation,
            validators: validator_refs,
            scheduler_plugin,
            on_checkpoint_file,
            run_config,
            n,
            bs,
            k,
            batches_per_epoch,
            total_steps,
            lr_schedule,
            optimizer,
            zero,
            step,
            pos,
            elapsed_s,
            last_lr,
            scaler,
            resized,
            grad_layout,
            metrics,
            bar,
            summary,
        })
    }

    /// One optimizer update: an accumulation window of `k` micro-batches (fewer at the end of
    /// an epoch, as accelerate syncs gradients at the end of the dataloader), the fp16 overflow
    /// check, clipping and AdamW. Logs and returns the step's record.
    pub(crate) fn train_step(&mut self) -> Result<StepRecord, TrainerError> {
        let t0 = Instant::now();
        let step_epoch = self.pos.epoch;
        let (n, bs, k, ws, rank) = (self.n, self.bs, self.k, self.ws, self.rank);
        let mut acc: Option<InnerTensors<B>> = None;
        // Per micro-step: this rank's loss weighted by its share of the micro-step's samples.
        let mut losses = Vec::new();
        let mut samples = 0usize;
        let mut timesteps = Vec::new();
        // Several processes: each rank's timesteps (t + 1) in its slots of every micro-step,
        // summed over the ranks with the gradients.
        let mut timestep_slots = vec![0f32; if ws > 1 { k as usize * ws * bs } else { 0 }];
        let mut dropped_captions = 0u32;
        for micro in 0..k as usize {
            if self.order_epoch != self.pos.epoch {
                self.order = epoch_order(self.config.seed, self.pos.epoch, n);
                self.batches = epoch_batches(&self.order, &self.bucket_of, bs);
                self.order_epoch = self.pos.epoch;
            }
            // The micro-step's batches, one per rank (fewer at the end of the epoch).
            let first = self.pos.batch as usize;
            let end = (first + ws).min(self.batches.len());
            let step_samples: usize = self.batches[first..end].iter().map(Vec::len).sum();
            samples += step_samples;
            let mut micro_loss = 0.0;
            if first + rank < end {
                let positions = &self.batches[first + rank];
                let idx: Vec<usize> = positions.iter().map(|&p| self.order[p]).collect();
                let idx = &idx[..];
                // Each sample's draws from its position in the run's sample sequence.
                let mut rngs: Vec<TrainRng> = positions
                    .iter()
                    .map(|&p| {
                        TrainRng::for_sample(self.config.seed, self.pos.epoch * n as u64 + p as u64)
                    })
                    .collect();
                let source = BatchSource {
                    cache: &self.cache,
                    model_config: &self.tc,
                    schedule: &self.tschedule,
                    images: self.image_encoder.as_ref(),
                    caption_dropout: self.caption_dropout.as_ref(),
                };
                let micro_batch = make_micro_batch::<B>(&source, idx, &mut rngs, &self.device)?;
                let (batch, draw) = (micro_batch.batch, micro_batch.draw);
                if ws > 1 {
                    let at = (micro * ws + rank) * bs;
                    for (slot, &t) in timestep_slots[at..].iter_mut().zip(&draw.timesteps) {
                        *slot = t as f32 + 1.0;
                    }
                } else {
                    timesteps.extend(draw.timesteps.iter().map(|&t| t as u32));
                }
                dropped_captions += micro_batch.dropped_captions as u32;
                let loss_scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
                let (loss, grads) = cogvx_train::loss_and_grads_scaled(
                    self.mode,
                    &mut self.model,
                    &self.tschedule.schedule,
                    &batch,
                    &draw,
                    loss_scale,
                )?;
                // The micro-step's gradient is the mean over its samples on every rank, and an
                // update the mean of its `k` micro-steps (accelerate's `loss / k`).
                let share = idx.len() as f64 / step_samples as f64;
                micro_loss = loss * share;
                let weight = share / k as f64;
                let grads: InnerTensors<B> = if weight == 1.0 {
                    grads
                } else {
                    grads
                        .into_iter()
                        .map(|(n, g)| (n, g.mul_scalar(weight)))
                        .collect()
                };
                acc = Some(match acc {
                    None => grads,
                    Some(mut a) => {
                        for (name, g) in grads {
                            let v = match a.remove(&name) {
                                Some(prev) => prev + g,
                                None => g,
                            };
                            a.insert(name, v);
                        }
                        a
                    }
                });
            }
            losses.push(micro_loss);
            self.pos.batch = end as u64;
            if self.pos.batch == self.batches_per_epoch {
                self.pos = DataPosition {
                    epoch: self.pos.epoch + 1,
                    batch: 0,
                };
                break;
            }
        }
        let mut grads = acc.unwrap_or_default();
        // Several processes: the step's extras (each micro-step's loss, the dropped captions,
        // the timesteps) are summed over the ranks with the gradients.
        let mut extras: Vec<f32> = Vec::new();
        if ws > 1 {
            extras.extend(losses.iter().map(|&l| l as f32));
            extras.push(dropped_captions as f32);
            extras.extend_from_slice(&timestep_slots);
        }
        let mut reduced = None;
        match &self.zero {
            // ZeRO-2: the gradients go to their owners (one reduce-scatter).
            Some(z) if z.across => {
                reduced = Some(zero::reduce_scatter(
                    self.world,
                    &z.sharding,
                    grads,
                    &mut extras,
                )?);
                grads = Default::default();
            }
            _ => {
                if ws > 1 {
                    // One all-reduce per update.
                    grads = all_reduce_step(
                        self.world,
                        &self.grad_layout,
                        grads,
                        &mut extras,
                        &self.device,
                    )?;
                }
                if let Some(z) = &self.zero {
                    // Offload alone: this process owns every tensor.
                    let all = std::mem::take(&mut grads);
                    reduced = Some(zero::reduce_scatter(
                        z.world(self.world),
                        &z.sharding,
                        all,
                        &mut Vec::new(),
                    )?);
                }
            }
        }
        if ws > 1 {
            let m = losses.len();
            losses = extras[..m].iter().map(|&l| l as f64).collect();
            dropped_captions = extras[m].round() as u32;
            timesteps = extras[m + 1..]
                .iter()
                .filter(|&&t| t > 0.0)
                .map(|&t| t.round() as u32 - 1)
                .collect();
        }
        let step = self.step;
        let lr = self.lr_schedule.lr_at(self.config.learning_rate, step);
        // fp16: the scaler records whether the gradients are finite; a step whose gradients
        // overflowed is skipped (the scale is halved).
        let finite = match &reduced {
            Some(r) => r.norm.is_finite(),
            None => cogvx_train::total_grad_norm(&grads).is_finite(),
        };
        let taken = self.scaler.as_mut().is_none_or(|s| s.update(finite));
        let grad_norm = if !taken {
            let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
            tracing::warn!(
                "step {}: fp16 gradients overflowed; step skipped, loss scale now {scale}",
                step + 1
            );
            self.summary.skipped_steps.push(step + 1);
            f64::INFINITY
        } else if let (Some(r), Some(z)) = (reduced, &mut self.zero) {
            // Each rank clips and steps its tensors; every rank gets every updated tensor.
            let norm = r.norm;
            let model_values;
            let params = match &z.masters {
                Some(m) => m,
                None => {
                    model_values = z.sharding.owned_on_host(self.mode.values(&mut self.model));
                    &model_values
                }
            };
            let updated = zero::step_and_gather(
                z.world(self.world),
                &z.sharding,
                &mut z.optimizer,
                r,
                params,
                lr,
                self.config.max_grad_norm,
            )?;
            if let Some(m) = &mut z.masters {
                for (k, (_, v)) in &updated {
                    if let Some(master) = m.get_mut(k) {
                        master.clone_from(v);
                    }
                }
            }
            let values: InnerTensors<B> = checkpoint::tensors_from_host(&updated, &self.device)
                .map_err(TrainerError::Input)?;
            self.mode.set_values(&mut self.model, &values)?;
            norm
        } else {
            cogvx_train::apply_update_for(
                self.mode,
                &mut self.model,
                grads,
                &mut self.optimizer,
                lr,
                Some(self.config.max_grad_norm),
            )?
        };
        let step = step + 1;
        self.step = step;
        self.last_lr = lr;
        let loss = losses.iter().sum::<f64>() / losses.len() as f64;
        let dt = t0.elapsed().as_secs_f64();
        self.elapsed_s += dt;
        let record = StepRecord {
            step,
            epoch: step_epoch,
            loss,
            lr,
            grad_norm,
            step_time_s: dt,
            samples_per_s: samples as f64 / dt.max(1e-9),
            timesteps,
            dropped_captions,
        };
        if let Some(metrics) = &mut self.metrics {
            metrics.log(&record)?;
        }
        self.bar.update(step, loss, lr);
        tracing::debug!("step {step}: loss {loss:.6} lr {lr:.3e} grad_norm {grad_norm:.4}");
        self.summary.losses.push((step, loss));
        if !loss.is_finite() {
            tracing::warn!("step {step}: the loss is {loss}");
        }
        Ok(record)
    }

    /// Writes `checkpoint-<step>/` (pruning old ones to `checkpoints_total_limit`).
    fn save_checkpoint(&mut self) -> Result<(), TrainerError> {
        self.last_saved = Some(self.step);
        // A sharded optimizer's states, gathered at rank 0 (every rank takes part).
        let gathered = self
            .zero
            .as_ref()
            .map(|z| zero::gather_states(z.world(self.world), &z.sharding, &z.optimizer));
        // Half-precision SFT: the checkpoint holds the f32 masters, not the model's half copies.
        let masters = self.zero.as_ref().and_then(|z| {
            let m = z.masters.as_ref()?;
            zero::gather_values(z.world(self.world), &z.sharding, m)
        });
        if self.rank != 0 {
            return Ok(());
        }
        let mut weights = host_tensors(&checkpoint_values(self.mode, &mut self.model));
        if let Some(m) = masters {
            weights.extend(m);
        }
        let optimizer = match gathered {
            Some(states) => states.expect("rank 0 gathers"),
            None => self.optimizer.state_to_host(),
        };
        let ck = Checkpoint {
            state: TrainerState {
                format: checkpoint::CHECKPOINT_FORMAT.into(),
                step: self.step,
                total_steps: self.total_steps,
                num_samples: self.n as u64,
                data: self.pos,
                lr_schedule: self.lr_schedule,
                last_lr: self.last_lr,
                elapsed_s: self.elapsed_s,
                config: self.config.clone(),
                validation: self.vconfig.clone(),
                loss_scaler: self.scaler.clone(),
                run_config: self.run_config.clone(),
                world_size: self.ws as u64,
                resized: self.resized,
            },
            weights,
            optimizer,
        };
        let dir = write_checkpoint(&self.out, &ck, self.on_checkpoint_file)?;
        if let Some(keep) = self.config.checkpoints_total_limit {
            for d in checkpoint::prune_checkpoints(&self.out, keep)? {
                tracing::info!("removed old checkpoint {}", d.display());
            }
        }
        tracing::info!("saved {}", dir.display());
        self.summary.last_checkpoint = Some(dir);
        Ok(())
    }

    /// Redraws `loss.png` from the metrics (a failure is a warning: the run goes on). Rank 0.
    fn plot(&self) {
        if self.rank != 0 {
            return;
        }
        if let Err(e) = cogvx_metrics::plot_loss_curve(
            &self.out.join(METRICS_FILE),
            &self.out.join(LOSS_PLOT_FILE),
        ) {
            tracing::warn!("loss curve not drawn: {e}");
        }
    }

    /// A checkpoint of the current step, and the loss curve.
    pub(crate) fn checkpoint(&mut self) -> Result<(), TrainerError> {
        self.save_checkpoint()?;
        self.plot();
        Ok(())
    }

    /// Samples the validation prompts with the current weights, runs the validators.
    /// Rank 0 alone (the others go on to the next step and wait for it there).
    pub(crate) fn validate(&mut self) -> Result<(), TrainerError> {
        self.last_validated = Some(self.step);
        let (Some(validation), Some(metrics)) = (&mut self.validation, &mut self.metrics) else {
            return Ok(());
        };
        let videos = validation.run(
            self.step,
            self.model.valid(),
            self.scheduler_plugin.as_deref_mut(),
            &mut self.validators,
            metrics,
            &self.device,
        )?;
        self.summary.validation_videos.extend(videos);
        Ok(())
    }

    /// The end of the run: a checkpoint of the last step (the official trainer's `must_save`),
    /// the loss curve, then (unless stopped early) validation and the export.
    pub(crate) fn finish(mut self) -> Result<TrainSummary, TrainerError> {
        let step = self.step;
        self.summary.step = step;
        if self.last_saved != Some(step) && step > 0 {
            self.save_checkpoint()?;
        }
        self.plot();
        self.bar.finish();
        if self.summary.stopped_early {
            tracing::info!(
                "stopped at step {step} of {}; resume with `Resume::Latest`",
                self.total_steps
            );
            return Ok(self.summary);
        }
        if self.vconfig.enabled() && self.last_validated != Some(step) {
            self.validate()?;
        }
        if self.rank != 0 {
            return Ok(self.summary);
        }
        let (path, reports) = crate::export::export(
            &mut self.model,
            &self.config,
            &self.spec,
            &self.adapter_params,
            &self.folder_transformer,
            &self.out,
            &self.device,
        )?;
        tracing::info!("wrote {}", path.display());
        self.summary.exported = Some(path);
        self.summary.export_reports = reports;
        Ok(self.summary)
    }
}

/// The checkpoint `resume` names: a given folder, or the newest one under `out` that reads back
/// whole (damaged ones are skipped with a warning; a run whose every checkpoint is damaged is an
/// error, not a fresh start).
fn find_resume_checkpoint(
    resume: Option<Resume>,
    out: &Path,
) -> Result<Option<(PathBuf, Checkpoint)>, TrainerError> {
    match resume {
        None => Ok(None),
        Some(Resume::Path(p)) => {
            if !p.join(checkpoint::STATE_FILE).is_file() {
                return input(format!(
                    "--resume {}: not a checkpoint folder (no {})",
                    p.display(),
                    checkpoint::STATE_FILE
                ));
            }
            let ck = read_checkpoint(&p)?;
            Ok(Some((p, ck)))
        }
        Some(Resume::Latest) => {
            let all = list_checkpoints(out)?;
            if all.is_empty() {
                tracing::info!("no checkpoint under {}; starting a new run", out.display());
            }
            let mut damaged = Vec::new();
            for (_, dir) in all.iter().rev() {
                match read_checkpoint(dir) {
                    Ok(ck) => return Ok(Some((dir.clone(), ck))),
                    Err(e) => {
                        tracing::warn!("skipping damaged checkpoint {}: {e}", dir.display());
                        damaged.push(e.to_string());
                    }
                }
            }
            if !all.is_empty() {
                return input(format!(
                    "--resume latest: every checkpoint under {} is damaged ({}); remove them to start a new run there",
                    out.display(),
                    damaged.join("; ")
                ));
            }
            Ok(None)
        }
    }
}

/// The trainable tensors of the model by name, on the host.
fn host_tensors<B: Backend>(t: &BTreeMap<String, AdapterTensor<B>>) -> checkpoint::HostTensors {
    t.iter()
        .map(|(k, v)| (k.clone(), (v.shape(), v.to_vec())))
        .collect()
}

fn from_host<B: Backend>(
    t: &checkpoint::HostTensors,
    device: &B::Device,
    path: &Path,
) -> Result<BTreeMap<String, AdapterTensor<B>>, TrainerError> {
    checkpoint::tensors_from_host(t, device).map_err(|message| TrainerError::Io {
        path: path.to_path_buf(),
        message,
    })
}

/// What a checkpoint stores of the model: every adapter parameter (trainable or not: a recipe
/// may have frozen, randomly initialised ones), or every transformer weight for SFT.
fn checkpoint_values<B: AutodiffBackend>(
    mode: TrainMode,
    model: &mut CogVideoXTransformer3DModel<B>,
) -> InnerTensors<B> {
    match mode {
        TrainMode::Adapter => cogvx_train::all_adapter_values(model),
        TrainMode::Full => cogvx_train::full_values(model),
    }
}

/// Shape-defining keys a resumed run must share with its checkpoint.
fn check_resumable(saved: &TrainConfig, now: &TrainConfig, dir: &Path) -> Result<(), TrainerError> {
    let mut diffs = Vec::new();
    macro_rules! same {
        ($k:ident) => {
            if saved.$k != now.$k {
                diffs.push(format!(
                    "`{}` = {:?} there, {:?} now",
                    stringify!($k),
                    saved.$k,
                    now.$k
                ));
            }
        };
    }
    same!(adapter);
    same!(rank);
    same!(alpha);
    same!(target_modules);
    same!(batch_size);
    same!(gradient_accumulation_steps);
    same!(seed);
    same!(mixed_precision);
    if !diffs.is_empty() {
        return input(format!(
            "cannot resume from {}: it was trained with other settings ({}); restore them or start a new run in another output_dir",
            dir.display(),
            diffs.join("; ")
        ));
    }
    for (k, a, b) in [
        ("learning_rate", saved.learning_rate, now.learning_rate),
        ("weight_decay", saved.weight_decay, now.weight_decay),
        ("max_grad_norm", saved.max_grad_norm, now.max_grad_norm),
        (
            "caption_dropout",
            saved.caption_dropout,
            now.caption_dropout,
        ),
    ] {
        if a != b {
            tracing::warn!("resuming {} with `{k}` = {b} (the checkpoint used {a}): the loss curve will differ from an uninterrupted run", dir.display());
        }
    }
    if saved.lr_scheduler != now.lr_scheduler || saved.lr_warmup_steps != now.lr_warmup_steps {
        tracing::warn!(
            "resuming {} with another learning-rate schedule",
            dir.display()
        );
    }
    Ok(())
}

/// Keys of the run config that name where something is, not what it is: a resume with another
/// value (a moved dataset or model folder) is logged, not refused.
const LOCATION_KEYS: &[&str] = &[
    "model.path",
    "data.root",
    "data.validation_root",
    "data.cache_dir",
    "plugins",
    "device",
];

/// `value` as `dotted.key -> JSON text` leaves (objects are descended into, arrays are leaves).
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        // `null` is an unset key (a key a newer build adds reads as unset in older checkpoints).
        serde_json::Value::Null => {}
        v => {
            out.insert(prefix.to_string(), v.to_string());
        }
    }
}

/// The rest of the config a resumed run must share with its checkpoint: every key outside
/// `[train]` and `[validation]` (which [`check_resumable`] compares), locations excepted.
fn check_same_run_config(
    saved: Option<&serde_json::Value>,
    now: Option<&serde_json::Value>,
    dir: &Path,
) -> Result<(), TrainerError> {
    let (Some(saved), Some(now)) = (saved, now) else {
        return Ok(());
    };
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", saved, &mut a);
    flatten("", now, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut diffs = Vec::new();
    for key in keys {
        if key.starts_with("train.") || key.starts_with("validation.") {
            continue;
        }
        let (x, y) = (a.get(key), b.get(key));
        if x == y {
            continue;
        }
        let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "unset".into());
        let location = LOCATION_KEYS
            .iter()
            .any(|l| key == l || key.starts_with(&format!("{l}.")));
        if location {
            tracing::warn!(
                "resuming {} with `{key}` = {} (the checkpoint's run had {})",
                dir.display(),
                show(y),
                show(x)
            );
        } else {
            diffs.push(format!("`{key}` = {} there, {} now", show(x), show(y)));
        }
    }
    if !diffs.is_empty() {
        return input(format!(
            "cannot resume from {}: its run had another config ({}); restore it or start a new run in another output_dir",
            dir.display(),
            diffs.join("; ")
        ));
    }
    Ok(())
}

/// The cache's distinct resolutions (buckets), in order of first use, and each sample's bucket
/// as an index into them.
fn bucket_ids(index: &cogvx_cache::Index) -> (Vec<[u32; 3]>, Vec<usize>) {
    let mut seen: Vec<[u32; 3]> = Vec::new();
    let ids = index
        .samples
        .iter()
        .map(|s| {
            let r = index.resolution_of(s);
            match seen.iter().position(|x| *x == r) {
                Some(i) => i,
                None => {
                    seen.push(r);
                    seen.len() - 1
                }
            }
        })
        .collect();
    (seen, ids)
}
