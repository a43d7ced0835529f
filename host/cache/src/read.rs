//! Reading: the index and the entries a training run loads, each validated against its key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::*;

/// Reads `<cache>/index.json`.
pub fn read_index(cache: &Path) -> Result<Index, CacheError> {
    let path = cache.join(INDEX);
    let bytes = std::fs::read(&path).map_err(|source| CacheError::Io {
        path: path.clone(),
        source,
    })?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|e| CacheError::Entry {
        path: path.clone(),
        message: format!("not a cache index: {e}; run `cogvx prepare` again"),
    })?;
    if index.format != INDEX_FORMAT {
        return Err(CacheError::Entry {
            path,
            message: format!(
                "index format {:?}, this build reads {INDEX_FORMAT:?}; run `cogvx prepare` again",
                index.format
            ),
        });
    }
    Ok(index)
}

pub(crate) fn validate_latent(
    path: &Path,
    key: &str,
    image: bool,
) -> Result<BTreeMap<String, HostTensor>, CacheError> {
    let t = store::read_entry(path, key)?;
    let bad = |m: String| CacheError::Entry {
        path: path.to_path_buf(),
        message: m,
    };
    match t.get("latent") {
        Some(l) if l.shape.len() == 4 => {}
        Some(l) => {
            return Err(bad(format!(
                "tensor `latent` has shape {:?}, expected [C, F, h, w]",
                l.shape
            )))
        }
        None => return Err(bad("no tensor `latent`".into())),
    }
    if image {
        match t.get("image") {
            Some(i) if i.shape.len() == 3 && i.shape[0] == 3 => {}
            Some(i) => {
                return Err(bad(format!(
                    "tensor `image` has shape {:?}, expected [3, H, W]",
                    i.shape
                )))
            }
            None => {
                return Err(bad(
                    "no tensor `image` (an I2V entry needs the conditioning image)".into(),
                ))
            }
        }
    }
    Ok(t)
}

pub(crate) fn validate_prompt(path: &Path, key: &str) -> Result<HostTensor, CacheError> {
    let mut t = store::read_entry(path, key)?;
    match t.remove("prompt_embedding") {
        Some(p) if p.shape.len() == 2 => Ok(p),
        Some(p) => Err(CacheError::Entry {
            path: path.to_path_buf(),
            message: format!(
                "tensor `prompt_embedding` has shape {:?}, expected [L, D]",
                p.shape
            ),
        }),
        None => Err(CacheError::Entry {
            path: path.to_path_buf(),
            message: "no tensor `prompt_embedding`".into(),
        }),
    }
}

/// One cached training sample.
#[derive(Clone, Debug)]
pub struct Entry {
    pub sample: IndexSample,
    /// Scaled latent `[C, F, h, w]`.
    pub latent: HostTensor,
    /// Prompt embedding `[L, D]`.
    pub prompt_embedding: HostTensor,
    /// I2V: the conditioning image `[3, H, W]` in [-1, 1].
    pub image: Option<HostTensor>,
}

/// A prepared cache, for the trainer.
#[derive(Clone, Debug)]
pub struct Cache {
    pub dir: PathBuf,
    pub index: Index,
}

impl Cache {
    /// Opens `<dir>/index.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CacheError> {
        let dir = dir.as_ref().to_path_buf();
        let index = read_index(&dir)?;
        Ok(Cache { dir, index })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.index.samples.len()
    }

    /// No samples.
    pub fn is_empty(&self) -> bool {
        self.index.samples.is_empty()
    }

    /// Loads and validates sample `i`: checksums, dtype, ranks, the latent's frame count and
    /// size against the index resolution and the VAE's 4x/8x compression, the prompt length,
    /// and the image size. Errors name the file.
    pub fn get(&self, i: usize) -> Result<Entry, CacheError> {
        let s = self.index.samples.get(i).ok_or_else(|| {
            CacheError::Input(format!(
                "sample {i} out of range: the cache has {} samples",
                self.len()
            ))
        })?;
        let lp = latent_path(&self.dir, &s.latent);
        let mut t = validate_latent(&lp, &s.latent, s.image)?;
        let latent = t.remove("latent").expect("validated");
        let [f, h, w] = self.index.resolution_of(s);
        let want = [(f as usize - 1) / 4 + 1, h as usize / 8, w as usize / 8];
        if latent.shape[1..] != want {
            return Err(CacheError::Entry {
                path: lp,
                message: format!(
                    "latent shape {:?} does not fit the resolution {f}x{h}x{w} (expected [C, {}, {}, {}]); run `cogvx prepare` again",
                    latent.shape, want[0], want[1], want[2]
                ),
            });
        }
        let image = t.remove("image");
        if let Some(img) = &image {
            if img.shape[1..] != [h as usize, w as usize] {
                return Err(CacheError::Entry {
                    path: lp,
                    message: format!("image shape {:?}, expected [3, {h}, {w}]", img.shape),
                });
            }
        }
        let pp = prompt_path(&self.dir, &s.prompt);
        let prompt_embedding = validate_prompt(&pp, &s.prompt)?;
        if prompt_embedding.shape[0] != self.index.max_sequence_length {
            return Err(CacheError::Entry {
                path: pp,
                message: format!(
                    "prompt embedding has {} tokens, the index says {}",
                    prompt_embedding.shape[0], self.index.max_sequence_length
                ),
            });
        }
        Ok(Entry {
            sample: s.clone(),
            latent,
            prompt_embedding,
            image,
        })
    }

    /// Removes entry files the index does not reference and temporary files left by an
    /// interrupted write; returns the paths removed. The cache holds one index: entries of
    /// another configuration prepared into the same folder are removed too.
    pub fn prune(&self) -> Result<Vec<PathBuf>, CacheError> {
        let mut keep = std::collections::BTreeSet::new();
        for s in &self.index.samples {
            keep.insert(latent_path(&self.dir, &s.latent));
            keep.insert(prompt_path(&self.dir, &s.prompt));
        }
        let mut removed = Vec::new();
        for sub in ["latents", "prompts"] {
            let d = self.dir.join(sub);
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CacheError::Io { path: d, source }),
            };
            for e in rd.filter_map(|e| e.ok()) {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = name.ends_with(".safetensors") || name.contains(".tmp-");
                if p.is_file() && ours && !keep.contains(&p) {
                    std::fs::remove_file(&p).map_err(|source| CacheError::Io {
                        path: p.clone(),
                        source,
                    })?;
                    removed.push(p);
                }
            }
        }
        Ok(removed)
    }

    /// All samples in index order, each loaded and validated on demand.
    pub fn entries(&self) -> impl Iterator<Item = Result<Entry, CacheError>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}
