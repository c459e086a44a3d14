//! Cleaning free text with ammonia, so that nothing one user sends can run in another
//! user's browser.
//!
//! Every string in a client event is cleaned before any plugin sees it, and markup in a
//! plugin's output is cleaned before any client does. The result is a safe HTML fragment:
//! a small set of formatting tags may survive (configured), everything else is escaped or
//! dropped, so "a < b" becomes "a &lt; b" and renders as typed. Text without `<`, `>`,
//! `&` or a no-break space is already its own clean form and skips ammonia entirely,
//! which keeps ordinary chat off ammonia's (comparatively expensive) parser.
//!
//! The cost is linear in the input whatever it holds. The HTML parser behind ammonia is
//! slow on character references (≈1 µs each, and worse than linear in long runs: 64 KiB
//! of `&` took 120 ms), and deep or misnested markup can make it do more, so it never sees
//! a client's text: a string is cut into its tags and the text between them, ammonia
//! cleans a skeleton of the tags with a placeholder for each run of text, and the runs,
//! escaped here, are put back where the placeholders landed. At most [`MAX_TAGS`] tags per
//! string count as markup.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::config::SanitizeSettings;

pub struct Sanitizer {
    policy: ammonia::Builder<'static>,
    /// Lower-case names of the allowed tags, to tell markup from text (see `segments`).
    tags: HashSet<&'static str>,
    /// Stands for a run of text in the skeleton given to ammonia. Random per process and
    /// never sent anywhere, so no input can contain it.
    placeholder: String,
}

/// Tags let through as markup per string; further ones are shown as text. Far more than a
/// chat message uses, and few enough that no arrangement of them is costly to parse.
const MAX_TAGS: usize = 128;
/// Longest tag name recognised (the allowed tags are HTML's, all short).
const MAX_TAG_NAME: usize = 16;

/// A piece of a string being cleaned.
enum Part<'a> {
    Text(&'a str),
    Tag(&'a str),
}

/// What a string being cleaned is.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Text a person typed: only allowed tags are markup, everything else is shown as typed.
    Text,
    /// Markup a program made: every tag goes to ammonia, character references stay.
    Markup,
}

/// Characters that ammonia would change in plain text (escape, or start markup).
fn needs_cleaning(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'<' | b'>' | b'&')) || s.contains('\u{a0}')
}

/// Appends `text` escaped as HTML text content. Typed text has every `&`, `<` and `>`
/// escaped (and the no-break space, as ammonia writes it); a program's text keeps its
/// character references, and only its `<` and `>` are escaped.
fn escape(text: &str, mode: Mode, out: &mut String) {
    let mut copied = 0;
    for (i, c) in text.char_indices() {
        let replacement = match c {
            '&' if mode == Mode::Text => "&amp;",
            '<' => "&lt;",
            '>' => "&gt;",
            '\u{a0}' => "&nbsp;",
            _ => continue,
        };
        out.push_str(&text[copied..i]);
        out.push_str(replacement);
        copied = i + c.len_utf8();
    }
    out.push_str(&text[copied..]);
}

/// Where a position in ammonia's output is: in text, in a tag, or in one of its quoted
/// attribute values (ammonia writes every value in double quotes, with `"` escaped).
#[derive(Clone, Copy, PartialEq)]
enum Context {
    Text,
    Tag,
    Quoted,
}

impl Context {
    fn after(mut self, html: &str) -> Context {
        for b in html.bytes() {
            self = match (self, b) {
                (Context::Text, b'<') => Context::Tag,
                (Context::Tag, b'>') => Context::Text,
                (Context::Tag, b'"') => Context::Quoted,
                (Context::Quoted, b'"') => Context::Tag,
                (context, _) => context,
            };
        }
        self
    }
}

impl Sanitizer {
    pub fn new(settings: &SanitizeSettings) -> Sanitizer {
        // The policy lives as long as the process; leaking its few strings gives the
        // builder the 'static lifetime it borrows them for.
        let leak = |v: &[String]| -> HashSet<&'static str> { v.iter().map(|s| &*s.clone().leak()).collect() };
        let tags = leak(&settings.allowed_tags);
        let allowed: HashSet<&'static str> = tags.clone();
        let mut policy = ammonia::Builder::empty();
        let mut attributes = HashMap::new();
        if tags.contains("a") {
            attributes.insert("a", HashSet::from(["href"]));
        }
        policy
            .tags(tags)
            .tag_attributes(attributes)
            .url_schemes(leak(&settings.url_schemes))
            .link_rel(Some("noopener noreferrer nofollow"))
            // Only absolute links with an allowed scheme: a relative "URL" is either a
            // mistake or an attempt to smuggle a scheme past the check.
            .url_relative(ammonia::UrlRelative::Deny)
            .clean_content_tags(HashSet::from(["script", "style"]))
            .strip_comments(true);
        let id = crate::conn::new_client_id();
        let placeholder = format!("\u{E000}{}\u{E000}", &id["client_".len()..]);
        Sanitizer { policy, tags: allowed, placeholder }
    }

    /// Cleans text a person typed: markup that is not allowed stays visible as text.
    pub fn clean<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if needs_cleaning(s) { Cow::Owned(self.clean_parts(s, Mode::Text)) } else { Cow::Borrowed(s) }
    }

    /// Cleans markup a program produced (plugin output, which mostly repeats text that was
    /// cleaned on the way in): character references are kept, so nothing is escaped twice.
    fn clean_markup<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if needs_cleaning(s) { Cow::Owned(self.clean_parts(s, Mode::Markup)) } else { Cow::Borrowed(s) }
    }

    fn clean_parts(&self, s: &str, mode: Mode) -> String {
        let parts = self.segments(s, mode);
        if !parts.iter().any(|p| matches!(p, Part::Tag(_))) {
            let mut out = String::with_capacity(s.len() + 16);
            escape(s, mode, &mut out);
            return out;
        }
        self.through_skeleton(&parts, mode).unwrap_or_else(|| {
            // Ammonia rearranged the skeleton in a way we do not follow (a placeholder
            // dropped, or inside a tag): show the whole string as text instead.
            let mut out = String::with_capacity(s.len() + 16);
            escape(s, mode, &mut out);
            out
        })
    }

    /// Cuts `s` into tags and the text between them, in one pass. A `<` starts a tag if a
    /// `>` comes before the next `<` and, for typed text, it opens or closes an allowed tag;
    /// after [`MAX_TAGS`] tags every `<` is text. The `>` is found by a cursor that only
    /// moves forward, so the whole pass is linear.
    fn segments<'a>(&self, s: &'a str, mode: Mode) -> Vec<Part<'a>> {
        let bytes = s.as_bytes();
        let mut parts = Vec::new();
        let mut text_from = 0;
        // The first '>' after the '<' being looked at (usize::MAX: none left).
        let mut gt = 0;
        let mut tags = 0;
        for i in memchr::memchr_iter(b'<', bytes) {
            if i < text_from || tags >= MAX_TAGS {
                continue;
            }
            if gt <= i {
                gt = memchr::memchr(b'>', &bytes[i + 1..]).map_or(usize::MAX, |p| i + 1 + p);
            }
            let closes = gt != usize::MAX && memchr::memchr(b'<', &bytes[i + 1..gt]).is_none();
            if closes && (mode == Mode::Markup || self.opens_allowed_tag(&s[i + 1..gt])) {
                if text_from < i {
                    parts.push(Part::Text(&s[text_from..i]));
                }
                parts.push(Part::Tag(&s[i..=gt]));
                text_from = gt + 1;
                tags += 1;
            }
        }
        if text_from < s.len() {
            parts.push(Part::Text(&s[text_from..]));
        }
        parts
    }

    /// Whether `tag` (what lies between a `<` and its `>`) opens or closes an allowed tag:
    /// `/`? name, then nothing, `/` or whitespace and attributes.
    fn opens_allowed_tag(&self, tag: &str) -> bool {
        let tag = tag.strip_prefix('/').unwrap_or(tag);
        let name_len = tag.bytes().take(MAX_TAG_NAME + 1).take_while(u8::is_ascii_alphanumeric).count();
        if name_len == 0 || name_len > MAX_TAG_NAME {
            return false;
        }
        let mut name = [0u8; MAX_TAG_NAME];
        name[..name_len].copy_from_slice(&tag.as_bytes()[..name_len]);
        name.make_ascii_lowercase();
        let known = std::str::from_utf8(&name[..name_len]).is_ok_and(|n| self.tags.contains(n));
        let after = &tag[name_len..];
        known && (after.is_empty() || after.starts_with('/') || after.starts_with(char::is_whitespace))
    }

    /// Has ammonia clean the tags alone, with a placeholder for each run of text, then puts
    /// the runs (escaped) back. `None` if a placeholder went missing or ended up anywhere
    /// but between tags: then the caller shows everything as text.
    fn through_skeleton(&self, parts: &[Part<'_>], mode: Mode) -> Option<String> {
        let mut skeleton = String::new();
        let mut texts = Vec::new();
        for part in parts {
            match part {
                Part::Tag(tag) => skeleton.push_str(tag),
                Part::Text(text) => {
                    skeleton.push_str(&self.placeholder);
                    texts.push(*text);
                }
            }
        }
        let html = self.policy.clean(&skeleton).to_string();
        let pieces: Vec<&str> = html.split(self.placeholder.as_str()).collect();
        if pieces.len() != texts.len() + 1 {
            return None;
        }
        let mut out = String::with_capacity(html.len() + texts.iter().map(|t| t.len() + 8).sum::<usize>());
        let mut context = Context::Text;
        for (i, piece) in pieces.iter().enumerate() {
            context = context.after(piece);
            out.push_str(piece);
            if let Some(text) = texts.get(i) {
                if context != Context::Text {
                    return None;
                }
                escape(text, mode, &mut out);
            }
        }
        Some(out)
    }

    /// Cleans every string of a client event in place (keys too: relays echo them).
    pub fn clean_event(&self, body: &mut Map<String, Value>) {
        self.clean_map(body, &|s| self.clean(s));
    }

    fn clean_map(&self, body: &mut Map<String, Value>, clean: &dyn Fn(&str) -> Cow<'_, str>) {
        if !body.keys().any(|k| needs_cleaning(k)) {
            body.values_mut().for_each(|v| self.clean_value(v, clean));
            return;
        }
        let taken = std::mem::take(body);
        for (k, mut v) in taken {
            self.clean_value(&mut v, clean);
            body.insert(clean(&k).into_owned(), v);
        }
    }

    fn clean_value(&self, v: &mut Value, clean: &dyn Fn(&str) -> Cow<'_, str>) {
        match v {
            Value::String(s) => {
                if let Cow::Owned(cleaned) = clean(s) {
                    *s = cleaned;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.clean_value(i, clean)),
            Value::Object(map) => self.clean_map(map, clean),
            _ => {}
        }
    }

    /// Whether cleaned text shows nothing but white space once rendered (`<b> </b>`).
    pub fn is_blank(cleaned: &str) -> bool {
        let mut in_tag = false;
        cleaned.chars().all(|c| match c {
            '<' => {
                in_tag = true;
                true
            }
            '>' if in_tag => {
                in_tag = false;
                true
            }
            c => in_tag || c.is_whitespace(),
        })
    }

    /// A plugin's serialized output: cleaned only if it could hold markup at all (the
    /// cleaned input never holds a raw `<`, so only script-made markup pays).
    pub fn clean_output(&self, json: String) -> String {
        if !json.as_bytes().contains(&b'<') {
            return json;
        }
        match serde_json::from_str::<Map<String, Value>>(&json) {
            Ok(mut map) => {
                self.clean_map(&mut map, &|s| self.clean_markup(s));
                serde_json::to_string(&map).unwrap_or(json)
            }
            Err(_) => json,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sanitizer() -> Sanitizer {
        Sanitizer::new(&crate::config::Settings::defaults().sanitize)
    }

    #[test]
    fn plain_text_is_untouched_and_escapes_round_trip() {
        let s = sanitizer();
        assert!(matches!(s.clean("hello, world! \"quoted\" 'single' é ✓"), Cow::Borrowed(_)));
        assert_eq!(s.clean("a < b && c > d"), "a &lt; b &amp;&amp; c &gt; d");
        assert_eq!(s.clean("<b>bold</b> <i>it</i>"), "<b>bold</b> <i>it</i>");
        // Tag-like text that is not allowed markup stays text.
        assert_eq!(
            s.clean("Vec<T> and x<y, hi <there> & welcome"),
            "Vec&lt;T&gt; and x&lt;y, hi &lt;there&gt; &amp; welcome"
        );
        assert_eq!(s.clean("typed &lt; literally"), "typed &amp;lt; literally");
        assert_eq!(s.clean("<B>loud</B><br/>"), "<b>loud</b><br>");
    }

    #[test]
    fn output_cleaning_leaves_clean_text_alone() {
        let s = sanitizer();
        let input = s.clean("a < b & <b>c</b>").into_owned();
        let json = serde_json::json!({"type": "x", "message": input}).to_string();
        assert_eq!(s.clean_output(json.clone()), json);
    }

    #[test]
    fn scripts_handlers_and_bad_urls_are_removed() {
        let s = sanitizer();
        // Markup that is not allowed is shown, escaped, as the text it is.
        assert_eq!(s.clean("<script>alert(1)</script>hi"), "&lt;script&gt;alert(1)&lt;/script&gt;hi");
        assert_eq!(s.clean("<img src=x onerror=alert(1)>"), "&lt;img src=x onerror=alert(1)&gt;");
        assert_eq!(s.clean("<a href=\"javascript:alert(1)\">x</a>"), "<a rel=\"noopener noreferrer nofollow\">x</a>");
        assert_eq!(
            s.clean("<a href=\"https://example.com\" onclick=\"x()\">x</a>"),
            "<a href=\"https://example.com\" rel=\"noopener noreferrer nofollow\">x</a>"
        );
        assert_eq!(s.clean("<b style=\"background:url(x)\">x</b>"), "<b>x</b>");
    }

    /// Text never lands inside a tag: a run of text that ammonia would have put into an
    /// attribute (a tag cut at a `>` inside quotes) makes the whole string text.
    #[test]
    fn text_never_lands_inside_a_tag() {
        let s = sanitizer();
        let attack = "<a href=\"https://e.com/>\" onmouseover=\"alert(1)<b x=\">x</a>";
        let out = s.clean(attack);
        assert!(!out.contains('<'), "{out}");
        // Program-made markup: a script and its text go, the rest stays.
        assert_eq!(
            s.clean_markup("<i>a &amp; b</i><script>x</script>"),
            "&lt;i&gt;a &amp; b&lt;/i&gt;&lt;script&gt;x&lt;/script&gt;"
        );
        assert_eq!(s.clean_markup("<i onclick=\"x()\">a &amp; b</i> &gt; c"), "<i>a &amp; b</i> &gt; c");
        // Past the tag budget, tags are text.
        let many = "<b>x</b>".repeat(MAX_TAGS);
        let cleaned = s.clean(&many);
        assert_eq!(cleaned.matches("<b>").count(), MAX_TAGS / 2);
        assert_eq!(cleaned.matches("&lt;b&gt;").count(), MAX_TAGS / 2);
    }

    /// The fast path is only taken where ammonia would not change the text anyway.
    #[test]
    fn the_fast_path_agrees_with_ammonia() {
        let s = sanitizer();
        for sample in ["plain", "quotes \" and ' ", "tabs\tand\nnewlines", "unicode ✓ 日本", "a=b; c/d", ""] {
            assert!(!needs_cleaning(sample));
            assert_eq!(s.policy.clean(sample).to_string(), sample, "{sample:?}");
        }
    }
}
