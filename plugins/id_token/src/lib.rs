//! # `id_token` — put an identifier token into every caption
//!
//! A prompt-rewriter plugin for subject/style fine-tuning (DreamBooth-style identifiers such as
//! `BW_STYLE`). Every caption gets the token, before it (`position = "prefix"`, default) or
//! after it (`"suffix"`), joined by `separator` (default one space) to the caption with its
//! leading and trailing whitespace trimmed; an empty caption becomes the token alone.
//!
//! The rewrite is **idempotent**: a caption that already contains the token as a whole word
//! (case-sensitive; not preceded or followed by a letter, digit or `_` where the token itself
//! starts or ends with one) is returned unchanged, so running the chain twice, or on captions
//! that were tagged by hand, never doubles it.
//!
//! ## Configuration (`[plugin.id_token]`)
//!
//! ```toml
//! [plugin.id_token]
//! token = "BW_STYLE"   # required
//! position = "prefix"  # or "suffix"
//! separator = " "      # e.g. ", "; must contain no letter, digit or '_'
//! ```
//!
//! Unknown keys are rejected by name.

use cogvx_plugin_api::{Plugin, PluginError, PluginInfo, PluginKind, PluginResult};
use serde::Deserialize;

/// The plugin's name (its crate folder); a loaded plugin of this name replaces the built-in.
pub const NAME: &str = "id_token";

/// Where the token goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Position {
    #[default]
    Prefix,
    Suffix,
}

fn default_separator() -> String {
    " ".to_string()
}

/// The `[plugin.id_token]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The identifier, e.g. `BW_STYLE` (trimmed; required).
    pub token: String,
    #[serde(default)]
    pub position: Position,
    #[serde(default = "default_separator")]
    pub separator: String,
}

/// The `id_token` plugin. It must be configured (the token is required) before rewriting.
#[derive(Clone, Debug, Default)]
pub struct IdToken {
    config: Option<Config>,
}

impl IdToken {
    /// A configured plugin (the config is validated as [`Plugin::configure`] would).
    pub fn new(config: Config) -> PluginResult<Self> {
        Ok(IdToken {
            config: Some(validate(config)?),
        })
    }
}

fn invalid(msg: String) -> PluginError {
    PluginError::Invalid(format!("{NAME}: {msg}"))
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn validate(mut config: Config) -> PluginResult<Config> {
    config.token = config.token.trim().to_string();
    if config.token.is_empty() {
        return Err(invalid(format!(
            "[plugin.{NAME}] token is empty; set it to your identifier, e.g. token = \"BW_STYLE\""
        )));
    }
    if config.token.chars().any(char::is_control) {
        return Err(invalid(format!(
            "[plugin.{NAME}] token {:?} contains a control character",
            config.token
        )));
    }
    if config.separator.is_empty()
        || config
            .separator
            .chars()
            .any(|c| is_word_char(c) || c.is_control())
    {
        return Err(invalid(format!(
            "[plugin.{NAME}] separator {:?} must be non-empty and contain no letter, digit, '_' or control \
             character (else the token would not stay a separate word), e.g. \" \" or \", \"",
            config.separator
        )));
    }
    Ok(config)
}

/// Parses and validates the `[plugin.id_token]` table given as JSON.
pub fn parse_config(params_json: &str) -> PluginResult<Config> {
    validate(cogvx_plugin_api::parse_params(NAME, params_json)?)
}

/// Whether `text` contains `token` as a whole word (see the crate docs).
pub fn contains_word(text: &str, token: &str) -> bool {
    let first_is_word = token.chars().next().is_some_and(is_word_char);
    let last_is_word = token.chars().next_back().is_some_and(is_word_char);
    text.match_indices(token).any(|(at, _)| {
        let before_ok = !first_is_word || !text[..at].chars().next_back().is_some_and(is_word_char);
        let after_ok = !last_is_word
            || !text[at + token.len()..]
                .chars()
                .next()
                .is_some_and(is_word_char);
        before_ok && after_ok
    })
}

/// Adds the token to one caption per `config` (idempotent).
pub fn add_token(caption: &str, config: &Config) -> String {
    if contains_word(caption, &config.token) {
        return caption.to_string();
    }
    let body = caption.trim();
    if body.is_empty() {
        return config.token.clone();
    }
    match config.position {
        Position::Prefix => format!("{}{}{body}", config.token, config.separator),
        Position::Suffix => format!("{body}{}{}", config.separator, config.token),
    }
}

impl Plugin for IdToken {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kinds: vec![PluginKind::PromptRewriter],
            description:
                "puts an identifier token into every caption (prefix or suffix), idempotently"
                    .to_string(),
        }
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        self.config = Some(parse_config(params_json)?);
        Ok(())
    }

    fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
        let config = self.config.as_ref().ok_or_else(|| {
            invalid(format!("no token configured; add a [plugin.{NAME}] table with token = \"YOUR_TOKEN\" to the config"))
        })?;
        Ok(add_token(caption, config))
    }
}

cogvx_plugin_api::export_plugin!(IdToken);

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(json: &str) -> IdToken {
        let mut p = IdToken::default();
        p.configure(json).unwrap();
        p
    }

    #[test]
    fn info_reports_name_version_kind() {
        let info = IdToken::default().info();
        assert_eq!(info.name, "id_token");
        assert_eq!(info.version, "0.1.0");
        assert_eq!(info.kinds, vec![PluginKind::PromptRewriter]);
    }

    #[test]
    fn prefix_by_default_with_trimmed_caption() {
        let mut p = plugin(r#"{"token":"BW_STYLE"}"#);
        assert_eq!(
            p.rewrite_prompt("  a man walks a dog.\n").unwrap(),
            "BW_STYLE a man walks a dog."
        );
        assert_eq!(p.rewrite_prompt("").unwrap(), "BW_STYLE");
        assert_eq!(p.rewrite_prompt(" \t ").unwrap(), "BW_STYLE");
    }

    #[test]
    fn suffix_and_separator() {
        let mut p = plugin(r#"{"token":" BW_STYLE ","position":"suffix","separator":", "}"#);
        assert_eq!(
            p.rewrite_prompt("a man walks a dog. ").unwrap(),
            "a man walks a dog., BW_STYLE"
        );
        let mut p = plugin(r#"{"token":"sks","separator":", "}"#);
        assert_eq!(p.rewrite_prompt("a sketch").unwrap(), "sks, a sketch");
    }

    #[test]
    fn idempotent_on_whole_words_only() {
        for json in [
            r#"{"token":"BW_STYLE"}"#,
            r#"{"token":"BW_STYLE","position":"suffix","separator":" - "}"#,
        ] {
            let mut p = plugin(json);
            for caption in [
                "a cat",
                "  two  cats  ",
                "",
                "BW_STYLEd photo",
                "xBW_STYLE",
                "a BW_STYLE_2 b",
            ] {
                let once = p.rewrite_prompt(caption).unwrap();
                assert!(contains_word(&once, "BW_STYLE"), "{once:?}");
                assert_eq!(
                    p.rewrite_prompt(&once).unwrap(),
                    once,
                    "not idempotent for {caption:?}"
                );
            }
        }
        let mut p = plugin(r#"{"token":"BW_STYLE"}"#);
        // Already present as a whole word: unchanged, even untrimmed and mid-caption.
        assert_eq!(
            p.rewrite_prompt(" a BW_STYLE photo, ").unwrap(),
            " a BW_STYLE photo, "
        );
        assert_eq!(
            p.rewrite_prompt("photo (BW_STYLE)").unwrap(),
            "photo (BW_STYLE)"
        );
        // Only part of another word: the token is added.
        assert_eq!(
            p.rewrite_prompt("BW_STYLEd photo").unwrap(),
            "BW_STYLE BW_STYLEd photo"
        );
        assert_eq!(
            p.rewrite_prompt("a BW_STYLE_2 b").unwrap(),
            "BW_STYLE a BW_STYLE_2 b"
        );
        // Case-sensitive.
        assert_eq!(
            p.rewrite_prompt("bw_style photo").unwrap(),
            "BW_STYLE bw_style photo"
        );
    }

    #[test]
    fn contains_word_with_non_word_token_edges() {
        assert!(contains_word("a <sks> dog", "<sks>"));
        assert!(contains_word("a<sks>dog", "<sks>"));
        assert!(contains_word("ünïcode token here", "token"));
        assert!(!contains_word("tokens here", "token"));
        assert!(!contains_word("étoken", "token"));
    }

    #[test]
    fn token_is_required_and_validated() {
        let mut p = IdToken::default();
        let e = p.rewrite_prompt("a cat").unwrap_err().to_string();
        assert!(
            e.contains("no token configured") && e.contains("[plugin.id_token]"),
            "{e}"
        );
        let e = p.configure("{}").unwrap_err().to_string();
        assert!(
            e.contains("missing field `token`") && e.contains("[plugin.id_token]"),
            "{e}"
        );
        let e = p.configure("").unwrap_err().to_string();
        assert!(e.contains("missing field `token`"), "{e}");
        let e = p.configure(r#"{"token":"  "}"#).unwrap_err().to_string();
        assert!(e.contains("token is empty"), "{e}");
        let e = p
            .configure(r#"{"token":"a\u0007"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("control character"), "{e}");
        let e = p
            .configure(r#"{"token":"X","separator":""}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("separator \"\" must be non-empty"), "{e}");
        let e = p
            .configure(r#"{"token":"X","separator":"_"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("separator \"_\""), "{e}");
        let e = p
            .configure(r#"{"token":"X","place":"prefix"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `place`"), "{e}");
        let e = p
            .configure(r#"{"token":"X","position":"middle"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `middle`"), "{e}");
        assert!(IdToken::new(Config {
            token: "T".into(),
            position: Position::Suffix,
            separator: " ".into()
        })
        .is_ok());
    }
}
