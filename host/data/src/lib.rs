//! # cogvx-data
//!
//! The data pipeline: the built-in `finetune-layout` dataset reader ([`FinetuneLayout`]),
//! [`check`] (every problem of a dataset, with file and line) and [`preview`] (the plugin
//! chain run over a dataset, writing `.mp4` clips, a contact sheet and the captions).
//! Plugins are called only through the [`cogvx_plugin_api::Plugin`] trait, whatever
//! their transport; the [`Chain`] lists them by kind. [`Buckets`] places each clip at one of
//! the training resolutions.

pub mod buckets;
pub mod chain;
pub mod check;
pub mod layout;
pub mod preview;

pub use buckets::{Assignment, Buckets};
pub use chain::{sample_seed, Chain};
pub use check::{check, check_structure, Report};
pub use layout::{
    read_layout, resolve_in_root, Columns, FinetuneLayout, Layout, Problem, READER_NAME,
};
pub use preview::{preview, PreviewError, PreviewOptions, Summary};
