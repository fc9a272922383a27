//! Byte framing for streamed replies: network reads become complete lines, whatever way the
//! bytes were cut. Lines stay bytes; decoding UTF-8 and JSON happens only on a whole line, so a
//! multi-byte character split across two reads is never mangled.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// Default longest line: Ollama's final `/api/generate` line carries the whole `context` array.
pub const DEFAULT_MAX_LINE: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a reply line is longer than {max} bytes")]
    LineTooLong { max: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Splits on `\n`, strips a trailing `\r`, and yields a final unterminated line at end of stream.
#[derive(Debug, Clone)]
pub struct LineCodec {
    max: usize,
    /// Bytes of the buffer already searched for `\n`, so a long line is not rescanned per read.
    scanned: usize,
}

impl LineCodec {
    pub fn new(max: usize) -> LineCodec {
        LineCodec { max, scanned: 0 }
    }
}

impl Default for LineCodec {
    fn default() -> Self {
        LineCodec::new(DEFAULT_MAX_LINE)
    }
}

fn trim_cr(mut line: BytesMut) -> Bytes {
    if line.last() == Some(&b'\r') {
        line.truncate(line.len() - 1);
    }
    line.freeze()
}

impl Decoder for LineCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match buf[self.scanned..].iter().position(|b| *b == b'\n') {
            Some(i) => {
                let end = self.scanned + i;
                self.scanned = 0;
                if end > self.max {
                    return Err(FrameError::LineTooLong { max: self.max });
                }
                let mut line = buf.split_to(end + 1);
                line.truncate(end);
                Ok(Some(trim_cr(line)))
            }
            None => {
                self.scanned = buf.len();
                if buf.len() > self.max {
                    return Err(FrameError::LineTooLong { max: self.max });
                }
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if let Some(line) = self.decode(buf)? {
            return Ok(Some(line));
        }
        self.scanned = 0;
        if buf.is_empty() {
            Ok(None)
        } else {
            Ok(Some(trim_cr(buf.split())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut codec = LineCodec::new(1024);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            while let Some(l) = codec.decode(&mut buf).unwrap() {
                out.push(l.to_vec());
            }
        }
        while let Some(l) = codec.decode_eof(&mut buf).unwrap() {
            out.push(l.to_vec());
        }
        out
    }

    #[test]
    fn any_cut_gives_the_same_lines() {
        let data = "{\"a\":\"é日🎉\"}\n{\"b\":2}\r\n\n{\"c\":3}".as_bytes();
        let whole = frame(&[data]);
        assert_eq!(whole, vec![b"{\"a\":\"\xc3\xa9\xe6\x97\xa5\xf0\x9f\x8e\x89\"}".to_vec(), b"{\"b\":2}".to_vec(), b"".to_vec(), b"{\"c\":3}".to_vec()]);
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(frame(&bytes), whole);
        for size in 2..data.len() {
            let parts: Vec<&[u8]> = data.chunks(size).collect();
            assert_eq!(frame(&parts), whole, "chunk size {size}");
        }
    }

    #[test]
    fn overlong_line_is_an_error() {
        let mut codec = LineCodec::new(8);
        let mut buf = BytesMut::from(&b"0123456789"[..]);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::LineTooLong { .. })));
    }
}
