//! # `caption_cleanup` — an example third-party cogvx plugin
//!
//! A prompt rewriter that tidies scraped captions before training. Its only cogvx dependency is
//! `cogvx-plugin-api`; the same crate builds to a `.wasm` component and a native `.so` (see
//! `README.md` next to this file, and `docs/plugins.md` for the author's guide).
//!
//! Each caption goes through, in order:
//!
//! 1. **control characters**: whitespace controls (tab, newline, …) become spaces; every other
//!    control character, the byte-order mark and zero-width spaces/joiners are removed;
//! 2. **whitespace**: runs of whitespace become one space, leading/trailing whitespace goes;
//! 3. **wrapping quotes** (`strip_quotes`, default on): while the caption is wrapped in a pair
//!    of `"…"`, `'…'`, `` `…` ``, `“…”`, `‘…’`, `„…“` or `«…»`, and neither quote character
//!    occurs inside except as an apostrophe between two letters (`dog's`), the pair is removed;
//! 4. **lowercase** (`lowercase`, default off);
//! 5. **truncation** (`max_words`, default none): only the first `max_words` words are kept.
//!
//! ```toml
//! [plugin.caption_cleanup]
//! lowercase = false
//! strip_quotes = true
//! max_words = 120   # optional
//! ```

use cogvx_plugin_api::serde::Deserialize;
use cogvx_plugin_api::{Plugin, PluginError, PluginInfo, PluginKind, PluginResult};

/// The plugin's name; configured under `[plugin.caption_cleanup]`.
pub const NAME: &str = "caption_cleanup";

/// The `[plugin.caption_cleanup]` table. Unknown keys are rejected by name.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(crate = "cogvx_plugin_api::serde", deny_unknown_fields, default)]
pub struct Config {
    pub lowercase: bool,
    pub strip_quotes: bool,
    /// Keep at most this many words (`None`: no limit).
    pub max_words: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lowercase: false,
            strip_quotes: true,
            max_words: None,
        }
    }
}

/// The plugin. `Default` is what the host instantiates; it then calls `configure`.
#[derive(Clone, Debug, Default)]
pub struct CaptionCleanup {
    config: Config,
}

/// Quote pairs removed when they wrap the whole caption.
const QUOTE_PAIRS: [(char, char); 7] = [
    ('"', '"'),
    ('\'', '\''),
    ('`', '`'),
    ('“', '”'),
    ('‘', '’'),
    ('„', '“'),
    ('«', '»'),
];

/// Steps 1 and 2: control characters out, whitespace collapsed.
fn normalize_whitespace(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .filter_map(|c| match c {
            '\u{feff}' | '\u{200b}' | '\u{200c}' | '\u{200d}' | '\u{2060}' => None,
            c if c.is_control() && c.is_whitespace() => Some(' '),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `q` occurs in `inner` other than as an apostrophe between two letters or digits.
fn has_bare_quote(inner: &str, q: char) -> bool {
    let chars: Vec<char> = inner.chars().collect();
    chars.iter().enumerate().any(|(i, &c)| {
        c == q
            && !(i > 0
                && i + 1 < chars.len()
                && chars[i - 1].is_alphanumeric()
                && chars[i + 1].is_alphanumeric())
    })
}

/// Step 3: removes quote pairs wrapping the whole (already trimmed) text, repeatedly.
fn strip_wrapping_quotes(mut text: &str) -> &str {
    'outer: loop {
        for (open, close) in QUOTE_PAIRS {
            if text.chars().count() >= 2 && text.starts_with(open) && text.ends_with(close) {
                let inner = &text[open.len_utf8()..text.len() - close.len_utf8()];
                if !has_bare_quote(inner, open) && !has_bare_quote(inner, close) {
                    text = inner.trim();
                    continue 'outer;
                }
            }
        }
        return text;
    }
}

/// The whole clean-up of one caption per `config`.
pub fn clean(caption: &str, config: &Config) -> String {
    let text = normalize_whitespace(caption);
    let text = if config.strip_quotes {
        strip_wrapping_quotes(&text).to_string()
    } else {
        text
    };
    let text = if config.lowercase {
        text.to_lowercase()
    } else {
        text
    };
    match config.max_words {
        Some(n) => text
            .split(' ')
            .take(n as usize)
            .collect::<Vec<_>>()
            .join(" "),
        None => text,
    }
}

impl Plugin for CaptionCleanup {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            name: NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            kinds: vec![PluginKind::PromptRewriter],
            description: "normalises whitespace, strips wrapping quotes and control characters, optionally lowercases and truncates captions".to_string(),
        }
    }

    fn configure(&mut self, params_json: &str) -> PluginResult<()> {
        let config: Config = cogvx_plugin_api::parse_params(NAME, params_json)?;
        if config.max_words == Some(0) {
            return Err(PluginError::Invalid(format!(
                "{NAME}: [plugin.{NAME}] max_words = 0 would empty every caption; remove it or set a positive number"
            )));
        }
        self.config = config;
        Ok(())
    }

    fn rewrite_prompt(&mut self, caption: &str) -> PluginResult<String> {
        Ok(clean(caption, &self.config))
    }
}

cogvx_plugin_api::export_plugin!(CaptionCleanup);

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(json: &str, caption: &str) -> String {
        let mut p = CaptionCleanup::default();
        p.configure(json).unwrap();
        p.rewrite_prompt(caption).unwrap()
    }

    #[test]
    fn info_reports_name_version_kind() {
        let info = CaptionCleanup::default().info();
        assert_eq!(info.name, "caption_cleanup");
        assert_eq!(info.version, "0.1.0");
        assert_eq!(info.kinds, vec![PluginKind::PromptRewriter]);
    }

    #[test]
    fn whitespace_and_control_characters() {
        assert_eq!(
            rewrite(
                "{}",
                "  A  dog\trunning\r\n on\u{0007} the\u{200b} beach.\u{0000} "
            ),
            "A dog running on the beach."
        );
        assert_eq!(
            rewrite("", "\u{feff}Line one\nline two"),
            "Line one line two"
        );
        assert_eq!(rewrite("{}", " \n\t "), "");
    }

    #[test]
    fn wrapping_quotes_are_stripped_but_inner_quotes_kept() {
        assert_eq!(rewrite("{}", "\"A cat sleeps.\""), "A cat sleeps.");
        assert_eq!(rewrite("{}", "  “ ‘A cat’ ”  "), "A cat");
        assert_eq!(rewrite("{}", "'the dog's bowl'"), "the dog's bowl");
        assert_eq!(rewrite("{}", "«Un chat»"), "Un chat");
        // Quotes that do not wrap the caption stay.
        assert_eq!(
            rewrite("{}", "\"Hi\" she said, \"bye\""),
            "\"Hi\" she said, \"bye\""
        );
        assert_eq!(rewrite("{}", "a \"quoted\" word"), "a \"quoted\" word");
        assert_eq!(rewrite("{}", "\""), "\"");
        assert_eq!(
            rewrite(r#"{"strip_quotes":false}"#, "\"A cat.\""),
            "\"A cat.\""
        );
    }

    #[test]
    fn lowercase_and_truncate() {
        assert_eq!(rewrite(r#"{"lowercase":true}"#, "A Big ÉLAN"), "a big élan");
        assert_eq!(
            rewrite(r#"{"max_words":3}"#, " one  two three four five"),
            "one two three"
        );
        assert_eq!(rewrite(r#"{"max_words":10}"#, "one two"), "one two");
        assert_eq!(
            rewrite(
                r#"{"max_words":2,"lowercase":true}"#,
                "\"Hello  World Again\""
            ),
            "hello world"
        );
    }

    #[test]
    fn idempotent() {
        let config = Config {
            lowercase: true,
            strip_quotes: true,
            max_words: Some(4),
        };
        for caption in ["\"A  b\" c", "  'x y z w v' ", "\u{0001}Q\n", "“”"] {
            let once = clean(caption, &config);
            assert_eq!(clean(&once, &config), once, "{caption:?}");
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut p = CaptionCleanup::default();
        let e = p
            .configure(r#"{"lower_case":true}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `lower_case`") && e.contains("[plugin.caption_cleanup]"),
            "{e}"
        );
        assert!(
            !e.contains("at line"),
            "JSON positions mean nothing to the user: {e}"
        );
        let e = p.configure(r#"{"max_words":0}"#).unwrap_err().to_string();
        assert!(e.contains("max_words = 0"), "{e}");
        let e = p.configure(r#"{"max_words":-1}"#).unwrap_err().to_string();
        assert!(
            e.contains("max_words") || e.contains("invalid value"),
            "{e}"
        );
    }

    #[test]
    fn builtin_constructor_from_export_macro() {
        let mut p = builtin();
        assert_eq!(p.info().name, "caption_cleanup");
        assert_eq!(p.rewrite_prompt(" 'hi' ").unwrap(), "hi");
    }
}
