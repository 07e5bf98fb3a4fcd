//! Texts an outsider chose (a caller's payload, a decode error quoting it,
//! a reply address), shown bounded: a log line or a reply never carries
//! more than a prefix of them and their length.

use std::fmt;

/// What of an outsider's text a line shows.
pub const SHOWN: usize = 200;

/// At most [`SHOWN`] bytes of `text` (cut at a character), then how long it
/// was: `abc… (1048576 bytes)`.
pub struct Clipped<'a>(pub &'a str);

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if text.len() <= SHOWN {
            return f.write_str(text);
        }
        let mut end = SHOWN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{}… ({} bytes)", &text[..end], text.len())
    }
}

impl fmt::Debug for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_texts_stay_whole_long_ones_keep_a_prefix_and_their_length() {
        assert_eq!(Clipped("abc").to_string(), "abc");
        let exact = "x".repeat(SHOWN);
        assert_eq!(Clipped(&exact).to_string(), exact);
        let long = "y".repeat(10 << 20);
        let shown = Clipped(&long).to_string();
        assert_eq!(
            shown,
            format!("{}… ({} bytes)", "y".repeat(SHOWN), 10 << 20)
        );
        // Never cut inside a character.
        let wide = "é".repeat(SHOWN);
        let shown = Clipped(&wide).to_string();
        assert!(shown.starts_with(&"é".repeat(SHOWN / 2)));
        assert!(shown.ends_with(&format!("… ({} bytes)", wide.len())));
    }
}
