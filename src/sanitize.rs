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
            .clean_content_tags(HashSet::from(["script", "style"]))
            .strip_comments(true);
        Sanitizer { policy }
    }

    pub fn clean<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if needs_cleaning(s) { Cow::Owned(self.policy.clean(s).to_string()) } else { Cow::Borrowed(s) }
    }

    /// Cleans every string of a client event in place (keys too: relays echo them).
    pub fn clean_event(&self, body: &mut Map<String, Value>) {
        if !body.keys().any(|k| needs_cleaning(k)) {
            body.values_mut().for_each(|v| self.clean_value(v));
            return;
        }
        let taken = std::mem::take(body);
        for (k, mut v) in taken {
            self.clean_value(&mut v);
            body.insert(self.clean(&k).into_owned(), v);
        }
    }

    fn clean_value(&self, v: &mut Value) {
        match v {
            Value::String(s) => {
                if let Cow::Owned(clean) = self.clean(s) {
                    *s = clean;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.clean_value(i)),
            Value::Object(map) => self.clean_event(map),
            _ => {}
        }
    }

    /// A plugin's serialized output: cleaned only if it could hold markup at all (the
    /// cleaned input never holds a raw `<`, so only script-made markup pays).
    pub fn clean_output(&self, json: String) -> String {
        if !json.as_bytes().contains(&b'<') {
            return json;
        }
        match serde_json::from_str::<Map<String, Value>>(&json) {
            Ok(mut map) => {
                self.clean_event(&mut map);
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
    }

    #[test]
    fn scripts_handlers_and_bad_urls_are_removed() {
        let s = sanitizer();
        assert_eq!(s.clean("<script>alert(1)</script>hi"), "hi");
        assert_eq!(s.clean("<img src=x onerror=alert(1)>"), "");
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
