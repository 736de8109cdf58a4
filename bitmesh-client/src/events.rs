//! A server-sent-events parser fed byte by byte (the HTTP body arrives that way):
//! collects `data:` lines and yields the event's data at the blank line that ends it.
//! Comments (`:` keep-alives) and other fields are ignored.

/// Longest line kept; longer lines are dropped (events are a few hundred bytes).
pub const MAX_LINE: usize = 16 * 1024;
/// Most data kept for one event: a gateway that sends `data:` lines without ever
/// ending the event must not grow the agent's memory without bound.
pub const MAX_EVENT: usize = 64 * 1024;

/// Parser state.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
    overflow: bool,
    /// The event in progress grew past [`MAX_EVENT`]: dropped at its blank line.
    event_overflow: bool,
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
            let data = self.data.take();
            return if std::mem::take(&mut self.event_overflow) { None } else { data };
        }
        let text = String::from_utf8_lossy(&line);
        if let Some(value) = text.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            if self.event_overflow || self.pending_len().saturating_add(value.len() + 1) > MAX_EVENT {
                self.data = Some(String::new());
                self.event_overflow = true;
                return None;
            }
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

    /// Bytes held for the event in progress (at most [`MAX_EVENT`] plus one line).
    pub fn pending_len(&self) -> usize {
        self.line.len() + self.data.as_ref().map_or(0, String::len)
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
    fn an_endless_event_is_bounded_and_dropped() {
        let mut p = SseParser::default();
        let line = format!("data: {}\n", "x".repeat(1000));
        for _ in 0..10_000 {
            for b in line.bytes() {
                assert_eq!(p.push(b), None);
            }
            assert!(p.pending_len() <= MAX_EVENT + MAX_LINE, "{}", p.pending_len());
        }
        assert_eq!(p.push(b'\n'), None, "the oversized event is dropped");
        let next: Vec<String> = "data: ok\n\n".bytes().filter_map(|b| p.push(b)).collect();
        assert_eq!(next, vec!["ok".to_owned()], "and the stream goes on");
    }

    #[test]
    fn an_unfinished_event_is_not_yielded() {
        assert!(feed("data: partial\n").is_empty());
    }
}
