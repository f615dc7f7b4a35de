//! Splitting text into chunks with the pre-tokenization regex.
//!
//! Any pattern runs on fancy-regex (it needs look-around and possessive quantifiers). For the
//! GPT-4 style family (the default pattern and nanochat's, which only differ in `\p{N}{1,k}`)
//! there is a fast path about 5x quicker: the regex crate's automaton on an equivalent pattern
//! without the fancy parts, plus one fix-up in code:
//!
//! * `[^\r\n\p{L}\p{N}]?+\p{L}+` and `[^\s\p{L}\p{N}]++[\r\n]*`: the possessive quantifiers
//!   never change a match, because the class they repeat excludes whatever follows them; so
//!   plain `?` and `+` match the same.
//! * `\s+(?!\S)|\s+`: both are only reached for a whitespace run that holds no `\r`/`\n`
//!   (`\s*[\r\n]` comes first and takes any run with a line break). Such a run, followed by a
//!   non-space, gives up its last character to the next chunk if it has at least two
//!   characters (that is `\s+(?!\S)` after backtracking); otherwise `\s+` takes all of it. So
//!   we match `\s+` and give the last character back in exactly that case.
//!
//! Both engines use leftmost-first alternation, as a backtracking engine does. The tests check
//! the fast path against the generic one and against Python's `regex` module.

use fancy_regex::Regex as FancyRegex;
use regex::Regex;

pub enum Splitter {
    /// A GPT-4 style pattern, rewritten for the regex crate (see the module docs).
    Gpt4Style(Regex),
    /// Any other pattern.
    Generic(FancyRegex),
}

const GPT4_STYLE_HEAD: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,";
const GPT4_STYLE_TAIL: &str = r"}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The fancy-free equivalent of a GPT-4 style pattern (`\p{N}{1,k}` for any k), else None.
fn gpt4_style_equivalent(pattern: &str) -> Option<String> {
    let max_digits = pattern
        .strip_prefix(GPT4_STYLE_HEAD)?
        .strip_suffix(GPT4_STYLE_TAIL)?;
    if max_digits.is_empty() || !max_digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!(
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,{}}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]|\s+",
        max_digits
    ))
}

impl Splitter {
    /// Compiles `pattern`; the error is fancy-regex's message for an invalid pattern.
    pub fn new(pattern: &str) -> Result<Splitter, fancy_regex::Error> {
        let fancy = FancyRegex::new(pattern)?;
        if let Some(equivalent) = gpt4_style_equivalent(pattern) {
            if let Ok(fast) = Regex::new(&equivalent) {
                return Ok(Splitter::Gpt4Style(fast));
            }
        }
        Ok(Splitter::Generic(fancy))
    }

    /// Calls `on_chunk` with every chunk of `text`, in order. Only the generic engine can fail
    /// (fancy-regex's backtracking limit on pathological input).
    pub fn for_each_chunk<'t>(
        &self,
        text: &'t str,
        mut on_chunk: impl FnMut(&'t str),
    ) -> Result<(), fancy_regex::Error> {
        match self {
            Splitter::Generic(fancy) => {
                for found in fancy.find_iter(text) {
                    on_chunk(found?.as_str());
                }
            }
            Splitter::Gpt4Style(fast) => {
                let mut position = 0;
                while let Some(found) = fast.find_at(text, position) {
                    let (start, mut end) = (found.start(), found.end());
                    if end < text.len() {
                        end -= whitespace_to_give_back(found.as_str());
                    }
                    on_chunk(&text[start..end]);
                    position = end;
                }
            }
        }
        Ok(())
    }
}

/// Bytes that a `\s+` chunk followed by a non-space leaves to the next chunk (see module docs).
/// Only a `\s+` match ends in whitespace other than a line break, so checking the last
/// character is enough to recognise it.
fn whitespace_to_give_back(chunk: &str) -> usize {
    match chunk.chars().next_back() {
        Some(last)
            if last.is_whitespace()
                && last != '\r'
                && last != '\n'
                && chunk.len() > last.len_utf8() =>
        {
            last.len_utf8()
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

    fn chunks<'t>(splitter: &Splitter, text: &'t str) -> Vec<&'t str> {
        let mut out = Vec::new();
        splitter.for_each_chunk(text, |c| out.push(c)).unwrap();
        out
    }

    #[test]
    fn fast_path_is_taken_only_for_the_gpt4_family() {
        assert!(matches!(
            Splitter::new(PATTERN).unwrap(),
            Splitter::Gpt4Style(_)
        ));
        let wrapped = format!("(?:{})", PATTERN);
        assert!(matches!(
            Splitter::new(&wrapped).unwrap(),
            Splitter::Generic(_)
        ));
        assert!(Splitter::new("(").is_err());
    }

    #[test]
    fn fast_path_equals_fancy_regex_on_random_text() {
        let fast = Splitter::new(PATTERN).unwrap();
        let generic = Splitter::Generic(FancyRegex::new(PATTERN).unwrap());
        let alphabet: Vec<char> =
            " \t\n\r\u{a0}\u{3000}\u{2028}aZé'sSdLtT19٣.,!?-_😀中\u{301}\u{200d}"
                .chars()
                .collect();
        let mut state = 0x2545F4914F6CDD1Du64;
        for _ in 0..20_000 {
            let mut text = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            for _ in 0..(state % 24) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            assert_eq!(
                chunks(&fast, &text),
                chunks(&generic, &text),
                "text {:?}",
                text
            );
        }
    }
}
