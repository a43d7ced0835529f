//! Reading SentencePiece's `spiece.model` (a serialized `sentencepiece.ModelProto`).
//!
//! Only the fields the T5 tokenizer needs are declared (field numbers from
//! `sentencepiece_model.proto`); prost skips the others. Defaults follow the proto2 schema.

use prost::Message;

/// `sentencepiece.ModelProto` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    /// The vocabulary, in id order.
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<SentencePiece>,
    /// How the model was trained (model type, special ids).
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    /// Text normalization (the precompiled character map).
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
}

/// `ModelProto.SentencePiece`.
#[derive(Clone, PartialEq, Message)]
pub struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    /// 1 NORMAL (default), 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE.
    #[prost(int32, optional, tag = "3")]
    pub r#type: Option<i32>,
}

/// `sentencepiece.TrainerSpec` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct TrainerSpec {
    /// 1 UNIGRAM (default), 2 BPE, 3 WORD, 4 CHAR.
    #[prost(int32, optional, tag = "3")]
    pub model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    pub byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    pub unk_id: Option<i32>,
    #[prost(int32, optional, tag = "42")]
    pub eos_id: Option<i32>,
    #[prost(int32, optional, tag = "43")]
    pub pad_id: Option<i32>,
}

/// `sentencepiece.NormalizerSpec` (subset).
#[derive(Clone, PartialEq, Message)]
pub struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
}

/// `TrainerSpec.ModelType.UNIGRAM`.
pub const MODEL_TYPE_UNIGRAM: i32 = 1;

impl ModelProto {
    /// Decodes a serialized model.
    pub fn decode_bytes(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        ModelProto::decode(bytes)
    }

    /// `(piece, score)` in id order, as transformers' `SentencePieceExtractor` lists them.
    pub fn vocab_scores(&self) -> Vec<(String, f64)> {
        self.pieces
            .iter()
            .map(|p| {
                (
                    p.piece.clone().unwrap_or_default(),
                    f64::from(p.score.unwrap_or(0.0)),
                )
            })
            .collect()
    }

    /// The model type (UNIGRAM when unset, the proto default).
    pub fn model_type(&self) -> i32 {
        self.trainer_spec
            .as_ref()
            .and_then(|t| t.model_type)
            .unwrap_or(MODEL_TYPE_UNIGRAM)
    }

    /// The unknown piece's id (0 when unset, the proto default).
    pub fn unk_id(&self) -> i32 {
        self.trainer_spec
            .as_ref()
            .and_then(|t| t.unk_id)
            .unwrap_or(0)
    }

    /// The precompiled normalization map, if the model has a non-empty one.
    pub fn precompiled_charsmap(&self) -> Option<&[u8]> {
        self.normalizer_spec
            .as_ref()
            .and_then(|n| n.precompiled_charsmap.as_deref())
            .filter(|m| !m.is_empty())
    }
}
