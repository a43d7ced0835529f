//! The T5 tokenizer against transformers' ids: the shared reference cases (`params.prompts` must
//! tokenize to `in.input_ids`) and `fixtures/tokenizer_ids.json` (extra strings, produced by
//! transformers 5.24 with `fixtures/gen_tokenizer_ids.py`).

use cogvx_model_core::case::Case;
use cogvx_text::{T5Tokenizer, TokenizerConfig, TokenizerSource};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn reference() -> PathBuf {
    cogvx_fixtures::reference("")
}

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizer_ids.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn case_prompts_and_ids(case: &Case) -> (Vec<String>, usize, Vec<Vec<u32>>) {
    let prompts: Vec<String> = case.params["prompts"]
        .as_array()
        .expect("params.prompts")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let max_length = case.params["max_length"]
        .as_u64()
        .expect("params.max_length") as usize;
    let ids = case.inputs.get("input_ids").expect("in.input_ids");
    let [n, l] = ids.shape[..] else {
        panic!("input_ids shape {:?}", ids.shape)
    };
    assert_eq!(n, prompts.len());
    let flat = ids.to_i64();
    let rows = (0..n)
        .map(|i| flat[i * l..(i + 1) * l].iter().map(|&x| x as u32).collect())
        .collect();
    (prompts, max_length, rows)
}

fn tokenizer_dir(reference: &Path, model: &str) -> PathBuf {
    reference.join(model).join("tokenizer")
}

fn config(dir: &Path) -> TokenizerConfig {
    TokenizerConfig::from_file(&dir.join("tokenizer_config.json")).unwrap()
}

/// The 2B set ships `tokenizer.json` (preferred by transformers, as by us) and `spiece.model`.
#[test]
fn cogvideox_2b_case_ids_from_tokenizer_json() {
    let reference = reference();
    let case = Case::load(&reference.join("cases/cogvideox-2b.text_encoder.safetensors")).unwrap();
    let dir = case.model_dir.join("tokenizer");
    let tok = T5Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(
        tok.source(),
        &TokenizerSource::TokenizerJson(dir.join("tokenizer.json"))
    );
    let (prompts, max_length, want) = case_prompts_and_ids(&case);
    assert_eq!(tok.encode_batch(&prompts, max_length).unwrap(), want);
}

/// The 1.5 set ships `spiece.model` only, like the hub checkpoints.
#[test]
fn cogvideox15_case_ids_from_spiece_model() {
    let reference = reference();
    let case =
        Case::load(&reference.join("cases/cogvideox1.5-5b.text_encoder.safetensors")).unwrap();
    let dir = case.model_dir.join("tokenizer");
    let tok = T5Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(
        tok.source(),
        &TokenizerSource::SentencePiece(dir.join("spiece.model"))
    );
    // 100 pieces + 100 sentinels, <extra_id_0> last (as transformers numbers them).
    assert_eq!(tok.vocab_size(), 200);
    assert_eq!(tok.token_to_id("<extra_id_0>"), Some(199));
    assert_eq!(tok.token_to_id("<extra_id_99>"), Some(100));
    let (prompts, max_length, want) = case_prompts_and_ids(&case);
    assert_eq!(tok.encode_batch(&prompts, max_length).unwrap(), want);
}

fn fixture_rows(fx: &Value, key: &str) -> Vec<Vec<u32>> {
    fx[key]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn fixture_strings(fx: &Value) -> Vec<String> {
    fx["strings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Unicode (NFKC folding, combining marks, emoji, CJK), odd whitespace, special tokens written in
/// the text, truncation and empty input, through both sources, against transformers.
#[test]
fn extra_strings_match_transformers_for_both_sources() {
    let reference = reference();
    let fx = fixture();
    let strings = fixture_strings(&fx);
    let max_length = fx["max_length"].as_u64().unwrap() as usize;
    for key in ["spiece", "tokenizer_json"] {
        let dir = tokenizer_dir(&reference, fx[key]["model"].as_str().unwrap());
        let tok = T5Tokenizer::from_dir(&dir).unwrap();
        let got = tok.encode_batch(&strings, max_length).unwrap();
        let want = fixture_rows(&fx, key);
        for ((s, g), w) in strings.iter().zip(&got).zip(&want) {
            assert_eq!(g, w, "{key}: {s:?}");
        }
    }
}

/// The 2B folder's `spiece.model` read directly gives the spiece ids (it is the same model as the
/// 1.5 folder's), and a `tokenizer.json` written from the SentencePiece pipeline reloads through
/// the `tokenizer.json` path to identical ids, normalizer included.
#[test]
fn spiece_and_tokenizer_json_paths_agree() {
    let reference = reference();
    let fx = fixture();
    let mut strings = fixture_strings(&fx);
    strings.push("x".repeat(500));
    strings.push("\u{ff34}\u{ff45}\u{ff58}\u{ff54}   with\u{3000}ideographic space".into());
    let dir = tokenizer_dir(&reference, "models/cogvideox-2b-tiny");
    let spm = T5Tokenizer::from_sentencepiece(&dir.join("spiece.model"), config(&dir)).unwrap();
    let max_length = fx["max_length"].as_u64().unwrap() as usize;
    let got = spm.encode_batch(&strings, max_length).unwrap();
    assert_eq!(
        got[..fixture_rows(&fx, "spiece").len()],
        fixture_rows(&fx, "spiece")[..]
    );

    let tmp = tempfile::tempdir().unwrap();
    let json_path = tmp.path().join("tokenizer.json");
    std::fs::write(&json_path, spm.to_json().unwrap()).unwrap();
    assert!(spm.to_json().unwrap().contains("\"Precompiled\""));
    let from_json = T5Tokenizer::from_tokenizer_json(&json_path, config(&dir)).unwrap();
    assert_eq!(from_json.vocab_size(), spm.vocab_size());
    for max_length in [1, 7, 16, 226] {
        assert_eq!(
            from_json.encode_batch(&strings, max_length).unwrap(),
            spm.encode_batch(&strings, max_length).unwrap()
        );
    }
}

#[test]
fn padding_truncation_and_eos() {
    let reference = reference();
    let tok =
        T5Tokenizer::from_dir(tokenizer_dir(&reference, "models/cogvideox1.5-5b-tiny")).unwrap();
    let long = "a cat dog ".repeat(100);
    for max_length in [1usize, 2, 16, 226] {
        let ids = tok
            .encode_batch(&[long.as_str(), "", "a cat"], max_length)
            .unwrap();
        for row in &ids {
            assert_eq!(row.len(), max_length);
        }
        assert_eq!(
            *ids[0].last().unwrap(),
            tok.eos_id(),
            "truncation keeps </s>"
        );
        assert_eq!(ids[1][0], tok.eos_id());
        assert!(ids[1][1..].iter().all(|&i| i == tok.pad_id()));
    }
    assert_eq!(tok.pad_id(), 0);
    let e = tok.encode_batch(&["x"], 0).unwrap_err().to_string();
    assert!(e.contains("max_length"), "{e}");
}

#[test]
fn clear_errors_for_bad_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let e = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("spiece.model") && e.contains(&tmp.path().display().to_string()),
        "{e}"
    );

    std::fs::write(tmp.path().join("spiece.model"), b"\xff\xff\xff not a proto").unwrap();
    let e = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("spiece.model") && e.contains("SentencePiece"),
        "{e}"
    );

    std::fs::write(
        tmp.path().join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": {}}}"#,
    )
    .unwrap();
    let e = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("Unigram"), "{e}");

    std::fs::write(
        tmp.path().join("tokenizer.json"),
        r#"{"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}"#,
    )
    .unwrap();
    let e = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("not a T5 vocabulary"), "{e}");

    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"extra_ids": "many"}"#,
    )
    .unwrap();
    let e = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("extra_ids"),
        "{e}"
    );
}

/// A huge caption is cut to the prefix that holds its first `max_length` tokens before it is
/// tokenized (a 20 MB caption took 2.9 GB to encode in full), with the same ids as in full.
#[test]
fn huge_captions_give_the_ids_of_their_prefix_without_encoding_it_all() {
    let tok = T5Tokenizer::from_dir(repo_tokenizer()).unwrap();
    let words = [
        "a", "cat", "sits", "on", "the", "red", "mat,", "slowly", "turning", "its", "head.",
    ];
    let long: String = (0..2_000)
        .map(|i| words[i % words.len()])
        .collect::<Vec<_>>()
        .join(" ");
    for max_length in [8usize, 226] {
        let full = tok.encode_batch(&[long.as_str()], max_length).unwrap();
        assert_eq!(full[0].len(), max_length);
        assert_eq!(full[0][max_length - 1], 1, "ends with </s>");
        assert_eq!(
            full[0][..3],
            tok.encode_batch(&["a cat sits"], 8).unwrap()[0][..3]
        );
        // Cutting at a word boundary past max_length words changes nothing.
        let prefix: String = long
            .split(' ')
            .take(max_length + 5)
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            tok.encode_batch(&[prefix.as_str()], max_length).unwrap(),
            full
        );
    }
    // 20 MB without a space, and 20 MB of words: the ids of a short prefix.
    let blob = "x".repeat(20 << 20);
    let spaced = "word ".repeat(4 << 20);
    for (text, prefix) in [
        (blob.as_str(), &blob[..64 * 226]),
        (spaced.as_str(), &spaced[..5 * 300]),
    ] {
        let ids = tok.encode_batch(&[text], 226).unwrap();
        assert_eq!(ids[0].len(), 226);
        assert_eq!(ids, tok.encode_batch(&[prefix], 226).unwrap());
    }
}

/// The tokenizer of the example model in the repository.
fn repo_tokenizer() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/models/cogvideox-2b-tiny/tokenizer"
    ))
}
