//! The plugin chain a dataset runs through, by kind.

use cogvx_plugin_api::{Plugin, PluginError};

/// The plugins that preprocess a dataset, by kind, in the order they run. The CLI fills it
/// from its plugin registry (built-in, `.so` or `.wasm` alike: every call goes through the
/// [`Plugin`] trait).
#[derive(Default)]
pub struct Chain<'a> {
    /// The dataset reader; `None` uses the built-in `finetune-layout` reader directly
    /// (which reports each problem with its file and line).
    pub reader: Option<&'a mut dyn Plugin>,
    /// The list files the built-in reader reads (with `reader: None`).
    pub columns: crate::Columns,
    /// Caption rewriters, applied in order.
    pub prompt_rewriters: Vec<&'a mut dyn Plugin>,
    /// Video transforms, in order: their plans first (each validated), then, after the plan
    /// is decoded, their pixel paths.
    pub video_transforms: Vec<&'a mut dyn Plugin>,
}

impl<'a> Chain<'a> {
    /// An empty chain (built-in reader, no rewriters, no transforms).
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs the caption through every prompt rewriter; the error names the plugin.
    pub fn rewrite_prompt(&mut self, caption: &str) -> Result<String, String> {
        rewrite(&mut self.prompt_rewriters, caption)
    }

    /// The rewriter and video-transform stages, borrowed together. Keep them for a whole
    /// run: the video stage remembers which plugins decline the pixel path, so their
    /// frames are not sent to them again.
    pub fn stages(&mut self) -> (PromptRewriters<'_, 'a>, cogvx_video::VideoTransforms<'_>) {
        let transforms = cogvx_video::VideoTransforms::new(
            self.video_transforms
                .iter_mut()
                .map(|p| &mut **p as &mut dyn Plugin)
                .collect(),
        );
        (
            PromptRewriters {
                plugins: &mut self.prompt_rewriters,
            },
            transforms,
        )
    }
}

/// The prompt rewriters of a [`Chain`], in order.
pub struct PromptRewriters<'c, 'a> {
    plugins: &'c mut Vec<&'a mut dyn Plugin>,
}

impl PromptRewriters<'_, '_> {
    /// Runs the caption through every rewriter; the error names the plugin.
    pub fn rewrite(&mut self, caption: &str) -> Result<String, String> {
        rewrite(self.plugins, caption)
    }
}

fn rewrite(plugins: &mut [&mut dyn Plugin], caption: &str) -> Result<String, String> {
    let mut caption = bounded_caption(caption, "the dataset")?;
    for p in plugins.iter_mut() {
        match p.rewrite_prompt(&caption) {
            Ok(c) => {
                caption = bounded_caption(
                    &c,
                    &format!("plugin `{}` (`rewrite-prompt`)", p.info().name),
                )?
            }
            Err(PluginError::Unsupported(_)) => {}
            Err(e) => {
                return Err(format!(
                    "plugin `{}` failed in `rewrite-prompt`: {e}",
                    p.info().name
                ))
            }
        }
    }
    Ok(caption)
}

/// The longest caption kept, in bytes: far more than the 226 tokens the text encoder reads
/// (a T5 token is at most 16 bytes); longer captions are cut at a character boundary.
pub const MAX_CAPTION_BYTES: usize = 16 * 1024;

/// Whether a caption has nothing to read: only whitespace and control characters (NULs
/// included).
pub fn is_blank_caption(caption: &str) -> bool {
    caption.chars().all(|c| c.is_whitespace() || c.is_control())
}

/// `caption` cut to [`MAX_CAPTION_BYTES`] (with a warning naming `from`); an error for a blank
/// caption.
pub fn bounded_caption(caption: &str, from: &str) -> Result<String, String> {
    if is_blank_caption(&caption[..floor_char_boundary(caption, MAX_CAPTION_BYTES)]) {
        return Err(format!(
            "{from} gave an empty caption (only whitespace or control characters)"
        ));
    }
    if caption.len() <= MAX_CAPTION_BYTES {
        return Ok(caption.to_string());
    }
    let end = floor_char_boundary(caption, MAX_CAPTION_BYTES);
    tracing::warn!("{from} gave a caption of {} bytes: only its first {end} bytes are kept (the text encoder reads 226 tokens)", caption.len());
    Ok(caption[..end].to_string())
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// The seed of sample `index` under base seed `base`: SplitMix64 of `base` and `index`, so
/// a sample keeps its seed whatever the order or subset processed.
pub fn sample_seed(base: u64, index: u64) -> u64 {
    let mut z = base
        ^ index
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x6A09_E667_F3BC_C909);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_per_sample_and_base() {
        let a: Vec<u64> = (0..100).map(|i| sample_seed(42, i)).collect();
        let mut b = a.clone();
        b.sort_unstable();
        b.dedup();
        assert_eq!(b.len(), 100);
        assert_ne!(sample_seed(1, 0), sample_seed(2, 0));
        assert_eq!(sample_seed(7, 3), sample_seed(7, 3));
    }
}
