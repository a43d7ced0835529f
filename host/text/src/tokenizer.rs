//! The T5 tokenizer, giving the ids of transformers' `T5Tokenizer` (the `tokenizers`-backed
//! class of transformers 5, which produced the reference data).
//!
//! It is a `tokenizers` Unigram pipeline built the way `T5Tokenizer.__init__` builds it:
//! the vocabulary with scores (from `tokenizer.json`, or from `spiece.model` followed by the
//! `<extra_id_N>` sentinels in reverse order, as `T5Converter.convert_from_spm` appends them),
//! `unk_id = 2`, SentencePiece's precompiled character map as the normalizer when the source
//! has one, `WhitespaceSplit` + `Metaspace("▁", prepend_scheme="always", split=True)` as the
//! pre-tokenizer, and `$A </s>` as the post-processor. `<pad>`, `</s>`, `<unk>` and the
//! sentinels are special added tokens, matched in the raw text.

use crate::spm::{ModelProto, MODEL_TYPE_UNIGRAM};
use crate::TextError;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, PreTokenizerWrapper, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

const PAD: &str = "<pad>";
const EOS: &str = "</s>";
const UNK: &str = "<unk>";
/// `T5Tokenizer` builds its Unigram model with `unk_id=2` whatever the source says.
const UNK_ID: usize = 2;
const METASPACE: char = '\u{2581}';

/// Where the tokenizer's vocabulary came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A `tokenizers` serialization (`tokenizer.json`).
    TokenizerJson(PathBuf),
    /// A SentencePiece model (`spiece.model`).
    SentencePiece(PathBuf),
}

/// The parts of `tokenizer_config.json` the T5 tokenizer uses.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerConfig {
    /// Number of `<extra_id_N>` sentinels (`extra_ids`, default 100).
    pub extra_ids: usize,
    /// `model_max_length`; `None` when absent or "unbounded" (transformers writes 1e30).
    pub model_max_length: Option<usize>,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            extra_ids: 100,
            model_max_length: None,
        }
    }
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`; a missing file gives the defaults.
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        if !path.is_file() {
            return Ok(TokenizerConfig::default());
        }
        let value = read_json(path)?;
        Self::from_value(&value, path)
    }

    fn from_value(value: &Value, path: &Path) -> Result<Self, TextError> {
        let bad = |key: &str, what: &str| TextError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("`{key}` must be {what}"),
        };
        let mut cfg = TokenizerConfig::default();
        if let Some(v) = value.get("extra_ids").filter(|v| !v.is_null()) {
            cfg.extra_ids = v
                .as_u64()
                .ok_or_else(|| bad("extra_ids", "a non-negative integer"))?
                as usize;
        }
        for (key, expected) in [("eos_token", EOS), ("pad_token", PAD), ("unk_token", UNK)] {
            if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
                let content = token_content(v)
                    .ok_or_else(|| bad(key, "a string or an object with `content`"))?;
                if content != expected {
                    return Err(TextError::Tokenizer {
                        path: path.to_path_buf(),
                        message: format!(
                            "`{key}` is {content:?}; the T5 tokenizer expects {expected:?} (is this a T5 tokenizer folder?)"
                        ),
                    });
                }
            }
        }
        if let Some(v) = value.get("model_max_length").filter(|v| !v.is_null()) {
            let n = v
                .as_f64()
                .ok_or_else(|| bad("model_max_length", "a number"))?;
            if n < 0.0 {
                return Err(bad("model_max_length", "non-negative"));
            }
            // transformers writes VERY_LARGE_INTEGER (1e30) for "no limit".
            cfg.model_max_length = if n < 1e18 { Some(n as usize) } else { None };
        }
        Ok(cfg)
    }
}

/// The T5 tokenizer (see the module docs for how it is built).
#[derive(Clone)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    eos_id: u32,
    config: TokenizerConfig,
    source: TokenizerSource,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("config", &self.config)
            .finish()
    }
}

impl T5Tokenizer {
    /// Loads a diffusers `tokenizer/` folder: `tokenizer.json` when present (transformers
    /// prefers it), else `spiece.model`; `tokenizer_config.json` for `extra_ids` and
    /// `model_max_length`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TextError> {
        let dir = dir.as_ref();
        let config = TokenizerConfig::from_file(&dir.join("tokenizer_config.json"))?;
        let json = dir.join("tokenizer.json");
        let spiece = dir.join("spiece.model");
        if json.is_file() {
            Self::from_tokenizer_json(&json, config)
        } else if spiece.is_file() {
            Self::from_sentencepiece(&spiece, config)
        } else {
            Err(TextError::Tokenizer {
                path: dir.to_path_buf(),
                message: "no `tokenizer.json` or `spiece.model` in this folder; point at the `tokenizer/` folder \
                          of a CogVideoX checkpoint"
                    .into(),
            })
        }
    }

    /// Builds the tokenizer from a SentencePiece `spiece.model`.
    pub fn from_sentencepiece(path: &Path, config: TokenizerConfig) -> Result<Self, TextError> {
        let bytes = std::fs::read(path).map_err(|source| TextError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let proto = ModelProto::decode_bytes(&bytes).map_err(|e| TextError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("not a SentencePiece model: {e}"),
        })?;
        let err = |message: String| TextError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        if proto.model_type() != MODEL_TYPE_UNIGRAM {
            return Err(err(format!(
                "SentencePiece model type {} is not Unigram; T5 tokenizers are Unigram models",
                proto.model_type()
            )));
        }
        if proto.pieces.is_empty() {
            return Err(err("the SentencePiece model has no pieces".into()));
        }
        if proto.unk_id() != UNK_ID as i32 {
            return Err(err(format!(
                "the unknown piece has id {}, T5 tokenizers have it at {UNK_ID}",
                proto.unk_id()
            )));
        }
        let mut vocab = proto.vocab_scores();
        // T5Converter.convert_from_spm: sentinels after the pieces, <extra_id_{n-1}> first.
        vocab.extend(
            (0..config.extra_ids)
                .rev()
                .map(|i| (format!("<extra_id_{i}>"), 0.0)),
        );
        let charsmap = proto.precompiled_charsmap().map(|m| m.to_vec());
        Self::build(
            vocab,
            charsmap,
            Vec::new(),
            config,
            TokenizerSource::SentencePiece(path.to_path_buf()),
        )
    }

    /// Builds the tokenizer from a `tokenizer.json`: its Unigram vocabulary, its precompiled
    /// character map if its normalizer has one, and its added tokens.
    pub fn from_tokenizer_json(path: &Path, config: TokenizerConfig) -> Result<Self, TextError> {
        let value = read_json(path)?;
        let err = |message: String| TextError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let model = value
            .get("model")
            .ok_or_else(|| err("no `model` section".into()))?;
        let model_type = model.get("type").and_then(Value::as_str).unwrap_or("");
        if model_type != "Unigram" {
            return Err(err(format!(
                "`model.type` is {model_type:?}; the T5 tokenizer needs a Unigram model"
            )));
        }
        let entries = model
            .get("vocab")
            .and_then(Value::as_array)
            .ok_or_else(|| err("`model.vocab` must be a list of [piece, score] pairs".into()))?;
        let mut vocab = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let pair = entry.as_array().filter(|p| p.len() == 2);
            let piece = pair.and_then(|p| p[0].as_str());
            let score = pair.and_then(|p| p[1].as_f64());
            match (piece, score) {
                (Some(piece), Some(score)) => vocab.push((piece.to_string(), score)),
                _ => {
                    return Err(err(format!(
                        "`model.vocab[{i}]` is not a [piece, score] pair: {entry}"
                    )))
                }
            }
        }
        let charsmap = match value.get("normalizer") {
            Some(n) if !n.is_null() => find_precompiled_charsmap(n).map_err(err)?,
            _ => None,
        };
        let mut added = Vec::new();
        if let Some(tokens) = value.get("added_tokens").and_then(Value::as_array) {
            for t in tokens {
                let content = t.get("content").and_then(Value::as_str).ok_or_else(|| {
                    err(format!("an entry of `added_tokens` has no `content`: {t}"))
                })?;
                let flag =
                    |k: &str, default: bool| t.get(k).and_then(Value::as_bool).unwrap_or(default);
                let special = flag("special", false);
                added.push(
                    AddedToken::from(content.to_string(), special)
                        .single_word(flag("single_word", false))
                        .lstrip(flag("lstrip", false))
                        .rstrip(flag("rstrip", false))
                        .normalized(flag("normalized", !special)),
                );
            }
        }
        Self::build(
            vocab,
            charsmap,
            added,
            config,
            TokenizerSource::TokenizerJson(path.to_path_buf()),
        )
    }

    fn build(
        vocab: Vec<(String, f64)>,
        charsmap: Option<Vec<u8>>,
        extra_added: Vec<AddedToken>,
        config: TokenizerConfig,
        source: TokenizerSource,
    ) -> Result<Self, TextError> {
        let path = match &source {
            TokenizerSource::TokenizerJson(p) | TokenizerSource::SentencePiece(p) => p.clone(),
        };
        let err = |message: String| TextError::Tokenizer {
            path: path.clone(),
            message,
        };
        let id_of = |token: &str| vocab.iter().position(|(p, _)| p == token);
        let (pad_id, eos_id) = match (id_of(PAD), id_of(EOS), id_of(UNK)) {
            (Some(pad), Some(eos), Some(UNK_ID)) => (pad as u32, eos as u32),
            (pad, eos, unk) => {
                return Err(err(format!(
                    "not a T5 vocabulary: expected `<pad>`, `</s>` and `<unk>` (at id {UNK_ID}), found ids {pad:?}, {eos:?}, {unk:?}"
                )))
            }
        };
        let model = Unigram::from(vocab, Some(UNK_ID), false)
            .map_err(|e| err(format!("bad Unigram vocabulary: {e}")))?;
        let mut tokenizer = Tokenizer::new(model);
        if let Some(map) = charsmap {
            let normalizer = Precompiled::from(&map)
                .map_err(|e| err(format!("bad precompiled character map: {e}")))?;
            tokenizer.with_normalizer(Some(normalizer));
        }
        let pre: Vec<PreTokenizerWrapper> = vec![
            WhitespaceSplit.into(),
            Metaspace::new(METASPACE, PrependScheme::Always, true).into(),
        ];
        tokenizer.with_pre_tokenizer(Some(Sequence::new(pre)));
        tokenizer.with_decoder(Some(MetaspaceDecoder::new(
            METASPACE,
            PrependScheme::Always,
            true,
        )));
        let template = TemplateProcessing::builder()
            .try_single(format!("$A {EOS}"))
            .and_then(|b| b.try_pair(format!("$A {EOS} $B {EOS}")))
            .map_err(|e| err(format!("template: {e}")))?
            .special_tokens(vec![(EOS, eos_id)])
            .build()
            .map_err(|e| err(format!("template: {e}")))?;
        tokenizer.with_post_processor(Some(template));

        // The special tokens transformers registers: eos, unk, pad, then the sentinels.
        let mut specials: Vec<AddedToken> = [EOS, UNK, PAD]
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        specials.extend(
            (0..config.extra_ids).map(|i| AddedToken::from(format!("<extra_id_{i}>"), true)),
        );
        tokenizer.add_special_tokens(&specials);
        let (special_extra, normal_extra): (Vec<_>, Vec<_>) =
            extra_added.into_iter().partition(|t| t.special);
        tokenizer.add_special_tokens(&special_extra);
        tokenizer.add_tokens(&normal_extra);
        Ok(T5Tokenizer {
            tokenizer,
            pad_id,
            eos_id,
            config,
            source,
        })
    }

    /// Tokenizes `prompts` like `tokenizer(prompts, padding="max_length", max_length=max_length,
    /// truncation=True, add_special_tokens=True).input_ids`: each row ends with `</s>` (kept
    /// when truncating) and is right-padded with `<pad>` (id 0) to exactly `max_length`.
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        prompts: &[S],
        max_length: usize,
    ) -> Result<Vec<Vec<u32>>, TextError> {
        if max_length == 0 {
            return Err(TextError::InvalidInput(
                "max_length must be at least 1 (room for `</s>`)".into(),
            ));
        }
        let mut tokenizer = self.tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| TextError::InvalidInput(format!("truncation: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: PAD.to_string(),
        }));
        // Only a prefix that surely holds the first `max_length` tokens is tokenized: a 20 MB
        // caption took 2.9 GB to encode in full before being truncated to 226 tokens.
        let cut: Vec<(&str, bool)> = prompts
            .iter()
            .map(|p| token_prefix(p.as_ref(), max_length))
            .collect();
        let inputs: Vec<&str> = cut.iter().map(|(p, _)| *p).collect();
        let encodings = tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| TextError::InvalidInput(format!("tokenizing failed: {e}")))?;
        for (i, e) in encodings.iter().enumerate() {
            if !e.get_overflowing().is_empty() || cut[i].1 {
                // diffusers' `_get_t5_prompt_embeds` warns the same way.
                tracing::warn!(
                    "prompt {i} was truncated to max_length={max_length} tokens (including `</s>`); the rest is ignored"
                );
            }
        }
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// Tokenizes one text without special tokens, padding or truncation (for inspection).
    pub fn tokenize(&self, text: &str) -> Result<Vec<String>, TextError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TextError::InvalidInput(format!("tokenizing failed: {e}")))?;
        Ok(enc.get_tokens().to_vec())
    }

    /// Number of ids, sentinels included (`len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of `token`, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The settings read from `tokenizer_config.json`.
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// The file the vocabulary was read from.
    pub fn source(&self) -> &TokenizerSource {
        &self.source
    }

    /// The pipeline as a `tokenizer.json` document (what transformers' `save_pretrained` writes).
    pub fn to_json(&self) -> Result<String, TextError> {
        self.tokenizer
            .to_string(false)
            .map_err(|e| TextError::InvalidInput(format!("serializing the tokenizer: {e}")))
    }
}

fn read_json(path: &Path) -> Result<Value, TextError> {
    let text = std::fs::read_to_string(path).map_err(|source| TextError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TextError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })
}

/// A special token entry of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_content(v: &Value) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(Value::as_str))
}

/// The `precompiled_charsmap` of a `Precompiled` normalizer, alone or inside a `Sequence`
/// (what transformers' `convert_to_native_format` looks for).
fn find_precompiled_charsmap(normalizer: &Value) -> Result<Option<Vec<u8>>, String> {
    let list: Vec<&Value> = match normalizer.get("type").and_then(Value::as_str) {
        Some("Sequence") => normalizer
            .get("normalizers")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![normalizer],
    };
    for n in list {
        if n.get("type").and_then(Value::as_str) == Some("Precompiled") {
            if let Some(b64) = n.get("precompiled_charsmap").and_then(Value::as_str) {
                return base64_decode(b64).map(Some).map_err(|e| {
                    format!("`normalizer.precompiled_charsmap` is not valid base64: {e}")
                });
            }
        }
    }
    Ok(None)
}

/// Standard base64 (with or without padding), as `tokenizers` writes the charsmap.
fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for (i, c) in s.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return Err(format!("unexpected byte {c:#04x} at {i}")),
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Bytes per token kept before tokenizing: a T5 piece is at most 16 bytes, so a prefix of
/// `64 x max_length` bytes holds more than `max_length` tokens.
const PREFIX_BYTES_PER_TOKEN: usize = 64;

/// The prefix of `text` that holds its first `max_length` tokens, and whether anything was cut:
/// the first `max_length + 1` whitespace-separated words (T5 splits on whitespace before its
/// unigram model, so whole words keep their tokens) and at most `64 x max_length` bytes.
fn token_prefix(text: &str, max_length: usize) -> (&str, bool) {
    let max_bytes = max_length.saturating_mul(PREFIX_BYTES_PER_TOKEN);
    let mut end = text.len();
    let mut words = 0usize;
    let mut in_word = false;
    for (i, c) in text.char_indices() {
        if i >= max_bytes {
            end = i;
            break;
        }
        let space = c.is_whitespace();
        if !space && !in_word {
            words += 1;
            if words > max_length + 1 {
                end = i;
                break;
            }
        }
        in_word = !space;
    }
    (&text[..end], end < text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_known_values() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("AAEC/w==").unwrap(), vec![0, 1, 2, 255]);
        assert!(base64_decode("a$b").is_err());
    }

    #[test]
    fn config_parses_huge_max_length_and_token_objects() {
        let v: Value = serde_json::from_str(
            r#"{"extra_ids": 7, "model_max_length": 1000000000000000019884624838656,
                "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}"#,
        )
        .unwrap();
        let cfg = TokenizerConfig::from_value(&v, Path::new("x.json")).unwrap();
        assert_eq!(
            cfg,
            TokenizerConfig {
                extra_ids: 7,
                model_max_length: None
            }
        );
        let v: Value = serde_json::from_str(r#"{"model_max_length": 226}"#).unwrap();
        assert_eq!(
            TokenizerConfig::from_value(&v, Path::new("x.json"))
                .unwrap()
                .model_max_length,
            Some(226)
        );
        let v: Value = serde_json::from_str(r#"{"eos_token": "<|endoftext|>"}"#).unwrap();
        let e = TokenizerConfig::from_value(&v, Path::new("x.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("eos_token") && e.contains("x.json"), "{e}");
    }
}
