//! Server-Sent Events, as OpenAI-compatible servers stream them: lines (already framed by
//! [`crate::framing::LineCodec`], so `\r\n` and `\n` both end a line) become events. `data:`
//! lines accumulate (several make one multi-line payload), `event:` sets the type, a line
//! starting with `:` is a comment (keep-alive), an empty line dispatches the event.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field; empty means the default type, `message`.
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// Accumulates fields line by line.
#[derive(Debug, Default)]
pub struct SseParser {
    event: String,
    data: String,
    has_data: bool,
    id: Option<String>,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds one line (without its terminator); returns an event when the line completes one.
    pub fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None; // a comment: servers send these to keep the connection alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = value.to_owned(),
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {} // `retry:` and unknown fields are ignored, as the spec says
        }
        None
    }

    /// At end of stream: an event whose blank line never came is still delivered, since some
    /// servers close right after the last `data:` line.
    pub fn finish(&mut self) -> Option<SseEvent> {
        self.dispatch()
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let has_data = std::mem::take(&mut self.has_data);
        let data = std::mem::take(&mut self.data);
        let event = std::mem::take(&mut self.event);
        if !has_data {
            return None;
        }
        Some(SseEvent { event, data, id: self.id.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out: Vec<SseEvent> = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).filter_map(|l| p.line(l)).collect();
        out.extend(p.finish());
        out
    }

    #[test]
    fn events_comments_and_multiline_data() {
        let ev = parse(": keep-alive\r\n\r\nevent: ping\r\ndata: {}\r\n\r\ndata: a\ndata:b\n\ndata: [DONE]\n\n");
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].event, "ping");
        assert_eq!(ev[1].data, "a\nb");
        assert_eq!(ev[2].data, "[DONE]");
    }

    #[test]
    fn last_event_without_blank_line() {
        let ev = parse("data: x");
        assert_eq!(ev, vec![SseEvent { event: String::new(), data: "x".into(), id: None }]);
    }

    #[test]
    fn id_and_retry_fields() {
        let ev = parse("id: 7\nretry: 100\ndata: y\n\n");
        assert_eq!(ev[0].id.as_deref(), Some("7"));
        assert_eq!(ev[0].data, "y");
    }
}
