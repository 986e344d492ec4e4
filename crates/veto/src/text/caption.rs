//! diffusers' caption cleaning for PixArt (`_text_preprocessing(clean_caption=True)`, the
//! pipeline's default, the DeepFloyd-IF rules run twice): URL, HTML, handle, CJK, id and
//! file-name removal, dash and quote unification, punctuation spacing, whitespace collapsing,
//! lower case.
//!
//! Two of its steps call libraries veto does not have, and are approximated:
//! - `BeautifulSoup(caption, "html.parser").text`: tags (`<...>` starting with a letter, `/` or
//!   `!`) are removed and character references decoded; malformed HTML may differ.
//! - `ftfy.fix_text` (mojibake repair): skipped; it leaves well-formed text as it is.
//!
//! Everything else is the same rule, in the same order.

use tokenizers::utils::SysRegex;

/// The caption as diffusers' PixArt pipelines feed it to the tokenizer.
pub fn clean_caption(text: &str) -> String {
    let rules = Rules::get();
    let once = rules.clean(text);
    rules.clean(&once)
}

struct Rules {
    url: [SysRegex; 2],
    handle: SysRegex,
    cjk: SysRegex,
    dashes: SysRegex,
    double_quotes: SysRegex,
    single_quotes: SysRegex,
    quot: SysRegex,
    amp: SysRegex,
    ip: SysRegex,
    article_id: SysRegex,
    escaped_newline: SysRegex,
    short_hash: SysRegex,
    long_hash: SysRegex,
    long_number: SysRegex,
    file_name: SysRegex,
    repeated_quotes: SysRegex,
    repeated_dots: SysRegex,
    bad_punct: SysRegex,
    lone_dot: SysRegex,
    dash_or_underscore: SysRegex,
    ids: [SysRegex; 3],
    spam: [SysRegex; 5],
    mixed_id: SysRegex,
    dimensions: SysRegex,
    colon: SysRegex,
    punct_then_word: SysRegex,
    spaces: SysRegex,
    leading_punct: SysRegex,
    trailing_punct: SysRegex,
    dotted_word: SysRegex,
}

fn re(pattern: &str) -> SysRegex {
    // The patterns are constants: a failure is a bug, caught by the tests.
    SysRegex::new(pattern).unwrap_or_else(|e| panic!("caption rule {pattern}: {e}"))
}

impl Rules {
    fn get() -> &'static Rules {
        static RULES: std::sync::OnceLock<Rules> = std::sync::OnceLock::new();
        RULES.get_or_init(Rules::new)
    }

    fn new() -> Self {
        let url_tail = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))";
        Rules {
            url: [
                re(&format!(r"\b((?:https?:(?:\/{{1,3}}|[a-zA-Z0-9%])|{url_tail}")),
                re(&format!(r"\b((?:www:(?:\/{{1,3}}|[a-zA-Z0-9%])|{url_tail}")),
            ],
            handle: re(r"@[\w\d]+\b"),
            cjk: re(
                r"[\x{31c0}-\x{31ef}\x{31f0}-\x{31ff}\x{3200}-\x{32ff}\x{3300}-\x{33ff}\x{3400}-\x{4dbf}\x{4dc0}-\x{4dff}\x{4e00}-\x{9fff}]+",
            ),
            dashes: re(
                r"[\x{002D}\x{058A}\x{05BE}\x{1400}\x{1806}\x{2010}-\x{2015}\x{2E17}\x{2E1A}\x{2E3A}\x{2E3B}\x{2E40}\x{301C}\x{3030}\x{30A0}\x{FE31}\x{FE32}\x{FE58}\x{FE63}\x{FF0D}]+",
            ),
            double_quotes: re("[`´«»“”¨]"),
            single_quotes: re("[‘’]"),
            quot: re("&quot;?"),
            amp: re("&amp"),
            ip: re(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"),
            article_id: re(r"\d:\d\d\s+$"),
            escaped_newline: re(r"\\n"),
            short_hash: re(r"#\d{1,3}\b"),
            long_hash: re(r"#\d{5,}\b"),
            long_number: re(r"\b\d{6,}\b"),
            file_name: re(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"),
            repeated_quotes: re(r#"["']{2,}"#),
            repeated_dots: re(r"[\.]{2,}"),
            bad_punct: re(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}"),
            lone_dot: re(r"\s+\.\s+"),
            dash_or_underscore: re(r"(?:\-|\_)"),
            ids: [re(r"\b[a-zA-Z]{1,3}\d{3,15}\b"), re(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"), re(r"\b\d+[a-zA-Z]+\d+\b")],
            spam: [
                re(r"(worldwide\s+)?(free\s+)?shipping"),
                re(r"(free\s)?download(\sfree)?"),
                re(r"\bclick\b\s(?:for|on)\s\w+"),
                re(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?"),
                re(r"\bpage\s+\d+\b"),
            ],
            mixed_id: re(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"),
            dimensions: re(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b"),
            colon: re(r"\b\s+\:\s+"),
            punct_then_word: re(r"(\D[,\./])\b"),
            spaces: re(r"\s+"),
            leading_punct: re(r"^['\_,\-\:;]"),
            trailing_punct: re(r"['\_,\-\:\-\+]$"),
            dotted_word: re(r"^\.\S+$"),
        }
    }

    fn clean(&self, text: &str) -> String {
        let mut s = unquote_plus(text).trim().to_lowercase();
        s = s.replace("<person>", "person");
        for r in &self.url {
            s = replace(r, &s, "");
        }
        s = html_text(&s);
        s = replace(&self.handle, &s, "");
        s = replace(&self.cjk, &s, "");
        s = replace(&self.dashes, &s, "-");
        s = replace(&self.double_quotes, &s, "\"");
        s = replace(&self.single_quotes, &s, "'");
        s = replace(&self.quot, &s, "");
        s = replace(&self.amp, &s, "");
        s = replace(&self.ip, &s, " ");
        s = replace(&self.article_id, &s, "");
        s = replace(&self.escaped_newline, &s, " ");
        s = replace(&self.short_hash, &s, "");
        s = replace(&self.long_hash, &s, "");
        s = replace(&self.long_number, &s, "");
        s = replace(&self.file_name, &s, "");
        s = replace(&self.repeated_quotes, &s, "\"");
        s = replace(&self.repeated_dots, &s, " ");
        s = replace(&self.bad_punct, &s, " ");
        s = replace(&self.lone_dot, &s, " ");
        if self.dash_or_underscore.find_iter(&s).count() > 3 {
            s = replace(&self.dash_or_underscore, &s, " ");
        }
        // ftfy.fix_text: skipped (module docs).
        s = unescape_html(&unescape_html(&s));
        for r in &self.ids {
            s = replace(r, &s, "");
        }
        for r in &self.spam {
            s = replace(r, &s, "");
        }
        s = replace(&self.mixed_id, &s, " ");
        s = replace(&self.dimensions, &s, "");
        s = replace(&self.colon, &s, ": ");
        s = append_after(&self.punct_then_word, &s, " ");
        s = replace(&self.spaces, &s, " ");
        s = strip_enclosing_quotes(&s);
        s = replace(&self.leading_punct, &s, "");
        s = replace(&self.trailing_punct, &s, "");
        s = replace(&self.dotted_word, &s, "");
        s.trim().to_string()
    }
}

/// Every match of `r` in `s` replaced by `with` (Python's `re.sub` with a plain replacement).
fn replace(r: &SysRegex, s: &str, with: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for (a, b) in r.find_iter(s) {
        out.push_str(&s[last..a]);
        out.push_str(with);
        last = b;
    }
    out.push_str(&s[last..]);
    out
}

/// Every match of `r` followed by `extra` (`re.sub(r"(...)", r"\1 ")`).
fn append_after(r: &SysRegex, s: &str, extra: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let mut last = 0;
    for (_, b) in r.find_iter(s) {
        out.push_str(&s[last..b]);
        out.push_str(extra);
        last = b;
    }
    out.push_str(&s[last..]);
    out
}

/// `^["']([\w\W]+)["']$` -> the inside.
fn strip_enclosing_quotes(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let quote = |c: char| c == '"' || c == '\'';
    if chars.len() >= 3 && quote(chars[0]) && quote(chars[chars.len() - 1]) {
        chars[1..chars.len() - 1].iter().collect()
    } else {
        s.to_string()
    }
}

/// `urllib.parse.unquote_plus`: `+` is a space, `%XX` bytes are decoded as UTF-8 (invalid
/// sequences become U+FFFD).
fn unquote_plus(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// BeautifulSoup's `.text` of a caption (module docs): tags removed, references decoded.
fn html_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let is_tag = after.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '!');
        match (is_tag, after.find('>')) {
            (true, Some(end)) => {
                out.push_str(&rest[..start]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str(&rest[..start + 1]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    unescape_html(&out)
}

/// `html.unescape` for the references captions carry: the common named ones and numeric ones.
fn unescape_html(s: &str) -> String {
    const NAMED: [(&str, &str); 7] =
        [("amp", "&"), ("lt", "<"), ("gt", ">"), ("quot", "\""), ("apos", "'"), ("nbsp", "\u{a0}"), ("#39", "'")];
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after.find(';').filter(|&e| e <= 10);
        let decoded = end.and_then(|e| {
            let name = &after[..e];
            if let Some((_, v)) = NAMED.iter().find(|(n, _)| *n == name) {
                return Some(((*v).to_string(), e + 1));
            }
            let code = name.strip_prefix("#x").or_else(|| name.strip_prefix("#X")).map_or_else(
                || name.strip_prefix('#').and_then(|d| d.parse::<u32>().ok()),
                |h| u32::from_str_radix(h, 16).ok(),
            );
            code.and_then(char::from_u32).map(|c| (c.to_string(), e + 1))
        });
        match decoded {
            Some((text, used)) => {
                out.push_str(&text);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_prompts_are_lower_cased_and_trimmed() {
        assert_eq!(clean_caption("  A Photo of a CAT  "), "a photo of a cat");
        assert_eq!(clean_caption("glasses, blurry"), "glasses, blurry");
    }

    #[test]
    fn references_and_percent_escapes() {
        assert_eq!(unescape_html("a &amp; b &#65; &#x42; &bogus; &"), "a & b A B &bogus; &");
        assert_eq!(unquote_plus("a+b%20c%"), "a b c%");
        assert_eq!(html_text("<b>x</b> < y"), "x < y");
    }
}
