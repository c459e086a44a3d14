//! Cleaning free text with ammonia, so that nothing one user sends can run in another
//! user's browser.
//!
//! Every string in a client event is cleaned before any plugin sees it, and markup in a
//! plugin's output is cleaned before any client does. The result is a safe HTML fragment:
//! a small set of formatting tags may survive (configured), everything else is escaped or
//! dropped, so "a < b" becomes "a &lt; b" and renders as typed. Text without `<`, `>`,
//! `&` or a no-break space is already its own clean form and skips ammonia entirely,
//! which keeps ordinary chat off ammonia's (comparatively expensive) parser.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::config::SanitizeSettings;

pub struct Sanitizer {
    policy: ammonia::Builder<'static>,
    /// Lower-case names of the allowed tags, to tell markup from text (see `escape_text`).
    tags: HashSet<&'static str>,
}

/// Characters that ammonia would change in plain text (escape, or start markup).
fn needs_cleaning(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'<' | b'>' | b'&')) || s.contains('\u{a0}')
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
        Sanitizer { policy, tags: allowed }
    }

    /// Cleans text a person typed: markup that is not allowed stays visible as text.
    pub fn clean<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if needs_cleaning(s) {
            Cow::Owned(self.policy.clean(&self.escape_text(s)).to_string())
        } else {
            Cow::Borrowed(s)
        }
    }

    /// Cleans markup a program produced (plugin output, which mostly repeats text that was
    /// cleaned on the way in): ammonia alone, which leaves clean HTML as it is, so nothing
    /// is escaped twice.
    fn clean_markup<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if needs_cleaning(s) { Cow::Owned(self.policy.clean(s).to_string()) } else { Cow::Borrowed(s) }
    }

    /// Escapes what is text, so that only markup reaches ammonia as markup: every `&` (a
    /// user who types "&lt;" means those four characters) and every `<` that does not open
    /// or close an allowed tag. Without this, "Vec<T>" would lose "<T>" as an unknown
    /// tag, and "x<y" would vanish as an unfinished one.
    fn escape_text(&self, s: &str) -> String {
        let mut out = String::with_capacity(s.len() + 16);
        for (i, c) in s.char_indices() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' if !self.opens_allowed_tag(&s[i + 1..]) => out.push_str("&lt;"),
                c => out.push(c),
            }
        }
        out
    }

    /// Whether `rest` (what follows a `<`) is an allowed tag: `/`? name, then `>`, `/>` or
    /// whitespace and attributes up to a `>`.
    fn opens_allowed_tag(&self, rest: &str) -> bool {
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let name_len = rest.bytes().take_while(u8::is_ascii_alphanumeric).count();
        if name_len == 0 || !self.tags.contains(rest[..name_len].to_ascii_lowercase().as_str()) {
            return false;
        }
        let after = &rest[name_len..];
        let closes = after.find('>').is_some_and(|end| !after[..end].contains('<'));
        closes && (after.starts_with('>') || after.starts_with("/>") || after.starts_with(char::is_whitespace))
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
