//! Wan2.1's prompt encoding (diffusers' `WanPipeline._get_t5_prompt_embeds`): the prompt cleaned
//! by [`prompt_clean`], tokenized with EOS and no BOS, cut to `max_sequence_length` (512), run
//! through UMT5, and the rows after the real tokens set to zero.
//!
//! Interface:
//! - `prompt_clean(text: &str) -> String`
//! - `encode_wan_prompt(tokenizer: &T5Tokenizer, encoder: &Umt5TextEncoder, prompt: &str,
//!   max_sequence_length: usize, what: &str, warnings: &mut Warnings) -> Result<WanPromptEmbeds>`;
//!   `WanPromptEmbeds::padded` is `[1, max_sequence_length, D]` (diffusers' layout, what NAG and
//!   CFG use), `WanPromptEmbeds::unpadded()` `[1, n, D]` (real tokens + EOS, VSF's negative).
//!
//! diffusers runs the encoder on the padded row with the attention mask; we run it on the real
//! tokens only. That is the same computation (padded keys are masked, and UMT5's position biases
//! depend on relative positions only) at a fraction of the cost for short prompts.

use candle_core::Tensor;

use super::t5::T5Tokenizer;
use super::umt5::Umt5TextEncoder;
use super::TokenizedText;
use crate::error::Result;
use crate::pipelines::Warnings;

/// diffusers' Wan pipelines pad and cut prompts to this many tokens.
pub const WAN_MAX_SEQUENCE_LENGTH: usize = 512;

/// One encoded prompt.
#[derive(Debug, Clone)]
pub struct WanPromptEmbeds {
    /// `[1, max_sequence_length, D]`: the real tokens' states, then zero rows.
    pub padded: Tensor,
    /// Number of real rows (the prompt's tokens plus EOS).
    pub len: usize,
    /// The text cut off by the token limit, when there was any.
    pub removed_text: Option<String>,
}

impl WanPromptEmbeds {
    /// `[1, len, D]`: the real tokens and EOS only (the official VSF code's negative prompt).
    pub fn unpadded(&self) -> Result<Tensor> {
        Ok(self.padded.narrow(1, 0, self.len)?)
    }
}

/// The ids diffusers feeds UMT5 for `prompt`: cleaned, EOS appended, cut to `max_len` (EOS kept),
/// padded with `<pad>`.
pub fn tokenize_wan_prompt(tokenizer: &T5Tokenizer, prompt: &str, max_len: usize) -> Result<TokenizedText> {
    tokenizer.tokenize(&prompt_clean(prompt), max_len)
}

/// Encode `prompt` as diffusers' Wan pipelines do; `what` names it ("prompt", "negative prompt")
/// in the warning pushed when the text is longer than `max_sequence_length` tokens.
pub fn encode_wan_prompt(
    tokenizer: &T5Tokenizer,
    encoder: &Umt5TextEncoder,
    prompt: &str,
    max_sequence_length: usize,
    what: &str,
    warnings: &mut Warnings,
) -> Result<WanPromptEmbeds> {
    let tok = tokenize_wan_prompt(tokenizer, prompt, max_sequence_length)?;
    if tok.truncated {
        warnings.push(format!(
            "the {what} is longer than UMT5's {max_sequence_length} tokens and was truncated; ignored: \"{}\"",
            tok.removed_text.clone().unwrap_or_default()
        ));
    }
    let real = encoder.encode_ids(&tok.ids[..tok.len])?;
    let padded = if tok.len < max_sequence_length {
        let (_, _, d) = real.dims3()?;
        let zeros = Tensor::zeros((1, max_sequence_length - tok.len, d), real.dtype(), real.device())?;
        Tensor::cat(&[&real, &zeros], 1)?
    } else {
        real
    };
    Ok(WanPromptEmbeds { padded, len: tok.len, removed_text: tok.removed_text })
}

// ---------------------------------------------------------------------------------------
// prompt_clean
// ---------------------------------------------------------------------------------------

/// diffusers' Wan `prompt_clean`: `ftfy.fix_text`, `html.unescape` twice, strip, every run of
/// whitespace to one space.
///
/// Our `fix_text` does ftfy's character fixes: HTML entities (ftfy unescapes once more when the
/// text has no `<`), Latin ligatures (`ﬁ` → `fi`), full/half-width forms (`Ａ` → `A`, U+3000 →
/// space), curly quotes to straight ones, removal of the control characters ftfy removes, NFC.
/// It does **not** repair mojibake (ftfy's `fix_encoding`: UTF-8 read as Latin-1/Windows-1252,
/// e.g. `cafÃ©` stays as is) nor strip terminal escape codes; and it knows the common named
/// HTML entities (plus every numeric one), not all 2231 of HTML5.
pub fn prompt_clean(text: &str) -> String {
    let unescapes = if text.contains('<') { 2 } else { 3 };
    let mut s = fix_characters(text);
    for _ in 0..unescapes {
        s = html_unescape(&s);
    }
    collapse_whitespace(&s)
}

/// ftfy's character-level fixes (see [`prompt_clean`]), then NFC.
fn fix_characters(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{2018}'..='\u{201b}' | '\u{02bc}' => out.push('\''),
            '\u{201c}'..='\u{201f}' => out.push('"'),
            '\u{3000}' => out.push(' '),
            c if is_removed_control(c) => {}
            c if is_ligature(c) || ('\u{ff01}'..='\u{ffef}').contains(&c) => out.push_str(&nfkc(&c.to_string())),
            c => out.push(c),
        }
    }
    nfc(&out)
}

/// ftfy's `fix_latin_ligatures` set.
fn is_ligature(c: char) -> bool {
    matches!(c, '\u{0132}' | '\u{0133}' | '\u{0149}' | '\u{01c4}'..='\u{01cc}' | '\u{01f1}'..='\u{01f3}' | '\u{fb00}'..='\u{fb06}')
}

/// ftfy's `remove_control_chars` set (tabs, newlines and form feeds stay).
fn is_removed_control(c: char) -> bool {
    matches!(c,
        '\u{00}'..='\u{08}' | '\u{0b}' | '\u{0e}'..='\u{1f}' | '\u{7f}' | '\u{206a}'..='\u{206f}' | '\u{feff}'
        | '\u{fff9}'..='\u{fffc}' | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e007f}')
}

fn normalize_with(text: &str, n: &dyn tokenizers::tokenizer::Normalizer) -> String {
    let mut s = tokenizers::NormalizedString::from(text);
    match n.normalize(&mut s) {
        Ok(()) => s.get().to_string(),
        Err(_) => text.to_string(),
    }
}
fn nfc(text: &str) -> String {
    normalize_with(text, &tokenizers::normalizers::NFC)
}
fn nfkc(text: &str) -> String {
    normalize_with(text, &tokenizers::normalizers::NFKC)
}

/// Python's `str.isspace` (what `re`'s `\s` and `str.strip` use): Unicode white space plus the
/// ASCII separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `re.sub(r"\s+", " ", text).strip()`.
fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(is_py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Named entities we decode (with `;`); the first group also without it, as HTML5 and Python's
/// `html.unescape` do for these legacy names.
const ENTITIES: &[(&str, &str, bool)] = &[
    ("amp", "&", true),
    ("lt", "<", true),
    ("gt", ">", true),
    ("quot", "\"", true),
    ("nbsp", "\u{a0}", true),
    ("copy", "\u{a9}", true),
    ("reg", "\u{ae}", true),
    ("deg", "\u{b0}", true),
    ("times", "\u{d7}", true),
    ("divide", "\u{f7}", true),
    ("middot", "\u{b7}", true),
    ("laquo", "\u{ab}", true),
    ("raquo", "\u{bb}", true),
    ("plusmn", "\u{b1}", true),
    ("sect", "\u{a7}", true),
    ("para", "\u{b6}", true),
    ("pound", "\u{a3}", true),
    ("yen", "\u{a5}", true),
    ("cent", "\u{a2}", true),
    ("iexcl", "\u{a1}", true),
    ("iquest", "\u{bf}", true),
    ("frac12", "\u{bd}", true),
    ("frac14", "\u{bc}", true),
    ("frac34", "\u{be}", true),
    ("eacute", "\u{e9}", true),
    ("egrave", "\u{e8}", true),
    ("ecirc", "\u{ea}", true),
    ("aacute", "\u{e1}", true),
    ("agrave", "\u{e0}", true),
    ("acirc", "\u{e2}", true),
    ("auml", "\u{e4}", true),
    ("ouml", "\u{f6}", true),
    ("uuml", "\u{fc}", true),
    ("Auml", "\u{c4}", true),
    ("Ouml", "\u{d6}", true),
    ("Uuml", "\u{dc}", true),
    ("szlig", "\u{df}", true),
    ("ccedil", "\u{e7}", true),
    ("ntilde", "\u{f1}", true),
    ("shy", "\u{ad}", true),
    ("apos", "'", false),
    ("trade", "\u{2122}", false),
    ("hellip", "\u{2026}", false),
    ("mdash", "\u{2014}", false),
    ("ndash", "\u{2013}", false),
    ("lsquo", "\u{2018}", false),
    ("rsquo", "\u{2019}", false),
    ("ldquo", "\u{201c}", false),
    ("rdquo", "\u{201d}", false),
    ("bull", "\u{2022}", false),
    ("euro", "\u{20ac}", false),
];

/// Windows-1252 for the C1 range, as `html.unescape` maps `&#128;`..`&#159;`.
const CP1252_C1: [u32; 32] = [
    0x20ac, 0x81, 0x201a, 0x0192, 0x201e, 0x2026, 0x2020, 0x2021, 0x02c6, 0x2030, 0x0160, 0x2039, 0x0152, 0x8d, 0x017d,
    0x8f, 0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014, 0x02dc, 0x2122, 0x0161, 0x203a, 0x0153, 0x9d,
    0x017e, 0x0178,
];

/// Python's `html.unescape` for numeric references and the entities of [`ENTITIES`].
fn html_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match decode_reference(after) {
            Some((decoded, used)) => {
                out.push_str(&decoded);
                rest = &after[used..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text a reference starting right after `&` stands for and the bytes it used.
fn decode_reference(s: &str) -> Option<(String, usize)> {
    if let Some(num) = s.strip_prefix('#') {
        let (digits, radix, skip) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex.chars().take_while(char::is_ascii_hexdigit).count(), 16, 2),
            None => (num.chars().take_while(char::is_ascii_digit).count(), 10, 1),
        };
        if digits == 0 {
            return None;
        }
        let body = &s[skip..skip + digits];
        let used = skip + digits + usize::from(s[skip + digits..].starts_with(';'));
        let code = u32::from_str_radix(body, radix).unwrap_or(u32::MAX);
        let c = match code {
            0x80..=0x9f => char::from_u32(CP1252_C1[(code - 0x80) as usize]),
            0 | 0xd800..=0xdfff => None,
            // Python drops references to these code points.
            0x01..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0xfdd0..=0xfdef => return Some((String::new(), used)),
            c if c & 0xfffe == 0xfffe && c <= 0x10ffff => return Some((String::new(), used)),
            c => char::from_u32(c),
        };
        return Some((c.unwrap_or('\u{fffd}').to_string(), used));
    }
    for &(name, value, legacy) in ENTITIES {
        if let Some(tail) = s.strip_prefix(name) {
            if tail.starts_with(';') {
                return Some((value.to_string(), name.len() + 1));
            }
            if legacy {
                return Some((value.to_string(), name.len()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_and_collapses() {
        assert_eq!(prompt_clean("  a &amp;amp; b\n\t c  "), "a & b c");
        assert_eq!(prompt_clean("&#x41;&#66;&#150;&lt"), "AB\u{2013}<");
        assert_eq!(prompt_clean("\u{201c}q\u{201d} \u{fb01} \u{ff21}\u{3000}x"), "\"q\" fi A x");
        assert_eq!(prompt_clean("&unknown; & x"), "&unknown; & x");
    }
}
