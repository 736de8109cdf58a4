//! A server-sent-events parser fed byte by byte (the HTTP body arrives that way):
//! collects `data:` lines and yields the event's data at the blank line that ends it.
//! Comments (`:` keep-alives) and other fields are ignored.

/// Longest line kept; longer lines are dropped (events are a few hundred bytes).
const MAX_LINE: usize = 16 * 1024;

/// Parser state.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
    overflow: bool,
}

impl SseParser {
    /// Feed one byte; returns an event's data when this byte completes it.
    pub fn push(&mut self, byte: u8) -> Option<String> {
        if byte == b'\r' {
            return None; // CRLF and LF both end a line; a lone CR is not sent by axum
        }
        if byte != b'\n' {
            if self.line.len() < MAX_LINE {
                self.line.push(byte);
            } else {
                self.overflow = true;
            }
            return None;
        }
        let line = std::mem::take(&mut self.line);
        if std::mem::take(&mut self.overflow) {
            return None;
        }
        if line.is_empty() {
            return self.data.take();
        }
        let text = String::from_utf8_lossy(&line);
        if let Some(value) = text.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(input: &str) -> Vec<String> {
        let mut p = SseParser::default();
        input.bytes().filter_map(|b| p.push(b)).collect()
    }

    #[test]
    fn events_end_at_the_blank_line_and_keep_alives_are_ignored() {
        let got = feed(":\n\nevent: usage\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: low_water\r\ndata: x\r\ndata: y\r\n\r\n");
        assert_eq!(got, vec!["{\"a\":1}".to_owned(), "x\ny".to_owned()]);
    }

    #[test]
    fn an_unfinished_event_is_not_yielded() {
        assert!(feed("data: partial\n").is_empty());
    }
}
