//! Text that crosses from a plugin (or a dataset) to the user's terminal and logs.

/// `text` made safe to print: control characters (ESC, NUL, newlines, ...) written as Rust
/// escapes (`\u{1b}`, `\u{0}`, `\n`), and cut after `max_bytes` with a note of how much was left
/// out. The host applies it to every name, message and log line a plugin returns, so a plugin
/// cannot move the cursor, clear the screen or flood the terminal.
pub fn display_safe(text: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_bytes) + 32);
    for (i, c) in text.char_indices() {
        if out.len() >= max_bytes {
            out.push_str(&format!("… ({} more bytes)", text.len() - i));
            return out;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::display_safe;

    #[test]
    fn control_characters_are_escaped_and_length_is_bounded() {
        assert_eq!(
            display_safe("a\u{1b}[2Jb\0\n", 100),
            "a\\u{1b}[2Jb\\u{0}\\n"
        );
        assert_eq!(display_safe("héllo", 100), "héllo");
        let long = "x".repeat(1000);
        assert_eq!(
            display_safe(&long, 10),
            format!("{}… (990 more bytes)", "x".repeat(10))
        );
    }
}
