//! The text the tool puts on the wire and the scanner that finds it again in what comes
//! back.
//!
//! A published message's `message` field is `<marker>:<publisher>:<seq>:<send ns>:` padded
//! with `x` to the requested size; a publisher's last word is `<marker>!<publisher>!`, a
//! stop sign that reaches each member after all of that publisher's messages. The servers
//! wrap the text in a `chat_message` object whose field order and extra fields vary
//! (rtgate emits keys in any order and adds `username`), so the receive path does not parse
//! JSON at all: it searches for the run's random marker (SIMD `memmem`) and reads three
//! integers by hand. That keeps the cost per delivery to a few tens of nanoseconds with no
//! allocation, which matters because the tool shares two cores with the server it
//! measures. Everything that carries no marker (welcome, join notices, errors) is rare and
//! takes the slow path, which still only slices strings.

use std::fmt::Write as _;

use memchr::memmem::Finder;

/// A string unique to one run, so that nothing but this run's own messages can be
/// mistaken for a delivery (a server shared with another run, a stale connection).
pub struct Marker {
    text: String,
    finder: Finder<'static>,
}

impl Marker {
    pub fn random() -> Marker {
        Marker::new(format!("rtb{:08x}", rand::random::<u32>()))
    }

    /// `text` must be plain ASCII letters and digits: it goes into JSON unescaped.
    pub fn new(text: String) -> Marker {
        debug_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric()));
        let finder = Finder::new(text.as_bytes()).into_owned();
        Marker { text, finder }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The marker without its fixed `rtb` prefix, for names that must be unique to the
    /// run but must not contain the marker itself (room names).
    pub fn unique_part(&self) -> &str {
        self.text.strip_prefix("rtb").unwrap_or(&self.text)
    }
}

/// What a received text frame turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// One of this run's chat messages.
    Delivery { publisher: u32, seq: u64, sent_ns: u64 },
    /// A publisher's stop sign: it will send nothing more.
    Stop { publisher: u32 },
    /// The marker followed by something this tool never sends.
    Malformed,
    /// No marker: a server notice (welcome, user_joined, error, …).
    Other,
}

impl Marker {
    /// Classifies one received text frame. Allocation-free; the hot path of the tool.
    #[inline]
    pub fn scan(&self, text: &[u8]) -> Inbound {
        let Some(at) = self.finder.find(text) else {
            return Inbound::Other;
        };
        let mut rest = &text[at + self.text.len()..];
        match rest.first() {
            Some(b':') => {
                rest = &rest[1..];
                let (Some(publisher), Some(seq), Some(sent_ns)) =
                    (take_number(&mut rest, b':'), take_number(&mut rest, b':'), take_number(&mut rest, b':'))
                else {
                    return Inbound::Malformed;
                };
                match u32::try_from(publisher) {
                    Ok(publisher) => Inbound::Delivery { publisher, seq, sent_ns },
                    Err(_) => Inbound::Malformed,
                }
            }
            Some(b'!') => {
                rest = &rest[1..];
                match take_number(&mut rest, b'!').map(u32::try_from) {
                    Some(Ok(publisher)) => Inbound::Stop { publisher },
                    _ => Inbound::Malformed,
                }
            }
            _ => Inbound::Malformed,
        }
    }
}

/// Reads decimal digits up to `end` and moves past it; `None` on anything else, on no
/// digits, or on overflow.
#[inline]
fn take_number(rest: &mut &[u8], end: u8) -> Option<u64> {
    let mut value: u64 = 0;
    for (i, &b) in rest.iter().enumerate() {
        if b == end {
            // `i` is also the number of digits read.
            if i == 0 {
                return None;
            }
            *rest = &rest[i + 1..];
            return Some(value);
        }
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(d))?;
    }
    None
}

/// The `chat` frame for one published message, its text padded to `size` bytes (or longer
/// if the header alone exceeds it).
pub fn chat_frame(room: &str, marker: &Marker, publisher: u32, seq: u64, sent_ns: u64, size: usize) -> String {
    let mut out = String::with_capacity(size + room.len() + 48);
    out.push_str("{\"type\":\"chat\",\"room\":\"");
    out.push_str(room);
    out.push_str("\",\"message\":\"");
    let body_start = out.len();
    // Writing into a String cannot fail.
    let _ = write!(out, "{}:{publisher}:{seq}:{sent_ns}:", marker.text);
    let body_len = out.len() - body_start;
    for _ in body_len..size {
        out.push('x');
    }
    out.push_str("\"}");
    out
}

/// The stop sign a publisher sends after its last message.
pub fn stop_frame(room: &str, marker: &Marker, publisher: u32) -> String {
    format!("{{\"type\":\"chat\",\"room\":\"{room}\",\"message\":\"{}!{publisher}!\"}}", marker.text)
}

pub fn join_frame(room: &str) -> String {
    format!("{{\"type\":\"join_room\",\"room\":\"{room}\"}}")
}

pub fn leave_frame(room: &str) -> String {
    format!("{{\"type\":\"leave_room\",\"room\":\"{room}\"}}")
}

/// The value of a top-level string field such as `"type"`, found by search rather than by
/// parsing. Only for the slow path: server notices, not deliveries.
pub fn string_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("\"{key}\":\"");
    let start = memchr::memmem::find(text.as_bytes(), needle.as_bytes())? + needle.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker() -> Marker {
        Marker::new("rtb0badf00d".to_string())
    }

    #[test]
    fn a_delivery_is_found_whatever_the_field_order() {
        let m = marker();
        let frame = chat_frame("r0", &m, 7, 42, 123_456_789, 100);
        let sent: serde_json::Value = serde_json::from_str(&frame).unwrap();
        let body = sent["message"].as_str().unwrap();
        assert_eq!(body.len(), 100);
        assert!(body.starts_with("rtb0badf00d:7:42:123456789:xx"));
        assert_eq!(sent["room"], "r0");
        assert_eq!(sent["type"], "chat");
        let want = Inbound::Delivery { publisher: 7, seq: 42, sent_ns: 123_456_789 };
        for echoed in [
            format!(r#"{{"type":"chat_message","clientId":"c1","message":"{body}","timestamp":1,"room":"r0"}}"#),
            format!(r#"{{"room":"r0","username":"guest-ab12","message":"{body}","seq":9,"type":"chat_message"}}"#),
        ] {
            assert_eq!(m.scan(echoed.as_bytes()), want);
        }
    }

    #[test]
    fn short_sizes_keep_the_whole_header() {
        let m = marker();
        let frame = chat_frame("r0", &m, 0, 0, 0, 1);
        assert!(frame.contains("\"message\":\"rtb0badf00d:0:0:0:\""));
        assert_eq!(m.scan(frame.as_bytes()), Inbound::Delivery { publisher: 0, seq: 0, sent_ns: 0 });
    }

    #[test]
    fn stop_signs_and_notices() {
        let m = marker();
        assert_eq!(m.scan(stop_frame("r1", &m, 3).as_bytes()), Inbound::Stop { publisher: 3 });
        assert_eq!(m.scan(br#"{"type":"user_joined","clientId":"c2","room":"r0"}"#), Inbound::Other);
        assert_eq!(m.scan(br#"{"type":"welcome","message":"Connected"}"#), Inbound::Other);
    }

    #[test]
    fn garbage_after_the_marker_is_malformed() {
        let m = marker();
        for bad in [
            "rtb0badf00d",
            "rtb0badf00d:",
            "rtb0badf00d:1:2:3",
            "rtb0badf00d:1::3:",
            "rtb0badf00d:1:2:x3:",
            "rtb0badf00d:99999999999:2:3:",
            "rtb0badf00d:1:2:99999999999999999999999:",
            "rtb0badf00d?1",
            "rtb0badf00d!!",
        ] {
            assert_eq!(m.scan(bad.as_bytes()), Inbound::Malformed, "{bad}");
        }
    }

    #[test]
    fn names_from_the_unique_part_are_not_deliveries() {
        let m = Marker::random();
        let room = format!("room-{}-0", m.unique_part());
        let notice = format!(r#"{{"type":"user_joined","clientId":"c2","room":"{room}"}}"#);
        assert_eq!(m.scan(notice.as_bytes()), Inbound::Other);
    }

    #[test]
    fn another_runs_marker_is_not_ours() {
        let ours = marker();
        let theirs = Marker::new("rtb12345678".to_string());
        let frame = chat_frame("r0", &theirs, 1, 1, 1, 100);
        assert_eq!(ours.scan(frame.as_bytes()), Inbound::Other);
    }

    #[test]
    fn string_fields_of_notices() {
        let text = r#"{"code":"busy","type":"error","message":"x"}"#;
        assert_eq!(string_field(text, "type"), Some("error"));
        assert_eq!(string_field(text, "code"), Some("busy"));
        assert_eq!(string_field(text, "room"), None);
        assert_eq!(join_frame("r0"), r#"{"type":"join_room","room":"r0"}"#);
        assert_eq!(leave_frame("r0"), r#"{"type":"leave_room","room":"r0"}"#);
    }
}
