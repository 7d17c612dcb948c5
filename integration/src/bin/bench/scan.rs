//! Reads a few members of a JSON object text without building it.
//!
//! The subscribers of `fanout` check every delivery; with 150,000 frames a second,
//! deserializing each whole frame with serde was about a quarter of the load generator's CPU
//! (`perf`, 2026-12-06), CPU the server under test then did not get. A [`Scanner`] walks the
//! object member by member, borrows the few values a check reads and skips the rest, and its
//! caller may stop as soon as it has what it needs. Strings with escapes are not decoded: a
//! wanted string that has one is reported as `None`, and the caller falls back to serde.

/// A cursor over a JSON text, positioned between values.
pub struct Scanner<'a> {
    text: &'a str,
    s: &'a [u8],
    at: usize,
    /// Just inside an object's `{`: its first member has no `,` before it.
    fresh: bool,
}

impl<'a> Scanner<'a> {
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            s: text.as_bytes(),
            at: 0,
            fresh: false,
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.at) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.at += 1)
    }

    /// Enters the object that starts here.
    pub fn begin_object(&mut self) -> Option<()> {
        self.eat(b'{')?;
        self.fresh = true;
        Some(())
    }

    /// The next member's key of the object being read (and its `:`), or `Ok(None)` at the
    /// object's end; `Err` on malformed text or an escaped key.
    pub fn next_key(&mut self) -> Result<Option<&'a str>, ()> {
        let first = std::mem::take(&mut self.fresh);
        match self.peek().ok_or(())? {
            b'}' => {
                self.at += 1;
                return Ok(None);
            }
            b',' if !first => self.at += 1,
            b'"' if first => {}
            _ => return Err(()),
        }
        let key = self.plain_str().ok_or(())?;
        self.eat(b':').ok_or(())?;
        Ok(Some(key))
    }

    /// A string value without escapes; `None` for anything else. (Control characters
    /// inside it are not refused: the text comes from the server under test.)
    pub fn plain_str(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let len = memchr::memchr2(b'"', b'\\', &self.s[start..])?;
        if self.s[start + len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        // Both ends are ASCII quotes: char boundaries of the text.
        self.text.get(start..start + len)
    }

    /// `null` (consumed): `Some(true)`; another value (left in place): `Some(false)`.
    pub fn null(&mut self) -> Option<bool> {
        if self.peek()? == b'n' {
            (self.s.get(self.at..self.at + 4)? == b"null").then(|| {
                self.at += 4;
                true
            })
        } else {
            Some(false)
        }
    }

    /// An integer value (`null` is `Some(None)`); `None` for anything else.
    pub fn int(&mut self) -> Option<Option<i64>> {
        if self.null()? {
            return Some(None);
        }
        let start = self.at;
        let len = self.s[start..]
            .iter()
            .position(|&b| !(b.is_ascii_digit() || b == b'-'))
            .unwrap_or(self.s.len() - start);
        let n = self.text.get(start..start + len)?.parse().ok()?;
        if matches!(self.s.get(start + len), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.at = start + len;
        Some(Some(n))
    }

    /// Steps over one value of any kind.
    pub fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.skip_str(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match *self.s.get(self.at)? {
                        b'"' => {
                            self.skip_str()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => {
                let start = self.at;
                while let Some(&b) = self.s.get(self.at) {
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.at += 1;
                }
                (self.at > start).then_some(())
            }
        }
    }

    fn skip_str(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            self.at += memchr::memchr2(b'"', b'\\', self.s.get(self.at..)?)?;
            if self.s[self.at] == b'"' {
                self.at += 1;
                return Some(());
            }
            self.at += 2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every member of a flat object, values skipped: the keys in order.
    fn keys(text: &str) -> Option<Vec<String>> {
        let mut s = Scanner::new(text);
        s.begin_object()?;
        let mut out = Vec::new();
        while let Some(k) = s.next_key().ok()? {
            out.push(k.to_string());
            s.skip()?;
        }
        Some(out)
    }

    #[test]
    fn skips_every_kind_of_value_to_the_next_key() {
        let text = r#"{"s":"a\"}b\\","o":{"x":[1,{"y":"]}"}],"z":null},"a":[],"n":-12.5e3,
            "t":true , "f":false,"last":"end"}"#;
        assert_eq!(
            keys(text).expect("keys"),
            ["s", "o", "a", "n", "t", "f", "last"]
        );
        assert_eq!(keys("{}").expect("keys"), Vec::<String>::new());
    }

    #[test]
    fn reads_plain_strings_and_integers() {
        let mut s = Scanner::new(r#"{"a":"plain","b":"esc\"aped","c":42,"d":null,"e":1.5}"#);
        s.begin_object().expect("scan");
        assert_eq!(s.next_key(), Ok(Some("a")));
        assert_eq!(s.plain_str(), Some("plain"));
        assert_eq!(s.next_key(), Ok(Some("b")));
        assert_eq!(s.plain_str(), None, "an escaped string is left to serde");
        let mut s = Scanner::new(r#"{"c":42,"d":null,"e":1.5,"f":-7}"#);
        s.begin_object().expect("scan");
        assert_eq!(s.next_key(), Ok(Some("c")));
        assert_eq!(s.int(), Some(Some(42)));
        assert_eq!(s.next_key(), Ok(Some("d")));
        assert_eq!(s.int(), Some(None));
        assert_eq!(s.next_key(), Ok(Some("e")));
        assert_eq!(s.int(), None, "not an integer");
        let mut s = Scanner::new(r#"{"f":-7}"#);
        s.begin_object().expect("scan");
        assert_eq!(s.next_key(), Ok(Some("f")));
        assert_eq!(s.int(), Some(Some(-7)));
        assert_eq!(s.next_key(), Ok(None));
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "",
            "[]",
            r#"{"a" 1}"#,
            r#"{"a":1 "b":2}"#,
            r#"{,"a":1}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":{"b":[1,2}"#,
            r#"{"a":}"#,
            r#"{"a":"ends in a backslash\"#,
        ] {
            assert!(keys(bad).is_none(), "{bad}");
        }
    }
}
