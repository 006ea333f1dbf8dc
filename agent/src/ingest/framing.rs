//! Frame decoders for stream sockets, built on tokio-util's codecs.
//!
//! Invariant: a decoder never buffers more than `max_message_size` (+ the length
//! header) for one frame; an oversize frame is an error for that connection only.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Decoder, LengthDelimitedCodec};

use crate::config::Framing;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message larger than max_message_size ({max} bytes)")]
    Oversize { max: usize },
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
pub enum FrameDecoder {
    Lines(AnyDelimiterCodec, usize),
    LengthPrefixed(LengthDelimitedCodec, usize),
}

impl FrameDecoder {
    pub fn new(framing: Framing, max: usize) -> Self {
        match framing {
            Framing::LengthPrefixed => FrameDecoder::LengthPrefixed(
                LengthDelimitedCodec::builder()
                    .big_endian()
                    .length_field_length(4)
                    .max_frame_length(max)
                    .new_codec(),
                max,
            ),
            // Datagram framing never reaches a stream decoder; lines is the safe reading.
            Framing::Lines | Framing::Datagram => FrameDecoder::Lines(
                AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), max),
                max,
            ),
        }
    }
}

impl Decoder for FrameDecoder {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self {
            FrameDecoder::Lines(c, max) => c.decode(src).map_err(|e| lines_error(e, *max)),
            FrameDecoder::LengthPrefixed(c, max) => c
                .decode(src)
                .map(|o| o.map(BytesMut::freeze))
                .map_err(|e| length_error(e, *max)),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self {
            FrameDecoder::Lines(c, max) => c.decode_eof(src).map_err(|e| lines_error(e, *max)),
            FrameDecoder::LengthPrefixed(c, max) => c
                .decode_eof(src)
                .map(|o| o.map(BytesMut::freeze))
                .map_err(|e| length_error(e, *max)),
        }
    }
}

fn lines_error(e: AnyDelimiterCodecError, max: usize) -> FrameError {
    match e {
        AnyDelimiterCodecError::MaxChunkLengthExceeded => FrameError::Oversize { max },
        AnyDelimiterCodecError::Io(io) => FrameError::Io(io),
    }
}

fn length_error(e: std::io::Error, max: usize) -> FrameError {
    // LengthDelimitedCodec reports an oversize frame as InvalidData.
    if e.kind() == std::io::ErrorKind::InvalidData {
        FrameError::Oversize { max }
    } else {
        FrameError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(d: &mut FrameDecoder, input: &[u8]) -> (Vec<Bytes>, Option<FrameError>) {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        match d.decode_eof(&mut buf) {
            Ok(Some(f)) => out.push(f),
            Ok(None) => {}
            Err(e) => return (out, Some(e)),
        }
        (out, None)
    }

    #[test]
    fn lines_split_and_keep_bytes_exact() {
        let mut d = FrameDecoder::new(Framing::Lines, 16);
        let (frames, err) = decode_all(&mut d, b"a\r\n\xffb\nlast");
        assert!(err.is_none());
        assert_eq!(
            frames,
            vec![
                Bytes::from_static(b"a\r"),
                Bytes::from_static(b"\xffb"),
                Bytes::from_static(b"last")
            ]
        );
    }

    #[test]
    fn oversize_line_is_an_error() {
        let mut d = FrameDecoder::new(Framing::Lines, 4);
        let (frames, err) = decode_all(&mut d, b"ok\ntoolong\n");
        assert_eq!(frames, vec![Bytes::from_static(b"ok")]);
        assert!(matches!(err, Some(FrameError::Oversize { max: 4 })));
    }

    #[test]
    fn length_prefixed_and_oversize() {
        let mut d = FrameDecoder::new(Framing::LengthPrefixed, 4);
        let mut input = vec![0, 0, 0, 3, b'a', b'b', b'c'];
        input.extend_from_slice(&[0, 0, 0, 9]);
        let (frames, err) = decode_all(&mut d, &input);
        assert_eq!(frames, vec![Bytes::from_static(b"abc")]);
        assert!(matches!(err, Some(FrameError::Oversize { max: 4 })));
    }

    proptest! {
        #[test]
        fn length_prefixed_round_trip(msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20)) {
            let mut input = Vec::new();
            for m in &msgs {
                input.extend_from_slice(&(m.len() as u32).to_be_bytes());
                input.extend_from_slice(m);
            }
            let mut d = FrameDecoder::new(Framing::LengthPrefixed, 64);
            let (frames, err) = decode_all(&mut d, &input);
            prop_assert!(err.is_none());
            prop_assert_eq!(frames.iter().map(|f| f.to_vec()).collect::<Vec<_>>(), msgs);
        }

        #[test]
        fn garbage_never_panics(input in proptest::collection::vec(any::<u8>(), 0..256), lp: bool) {
            let mut d = FrameDecoder::new(if lp { Framing::LengthPrefixed } else { Framing::Lines }, 32);
            let _ = decode_all(&mut d, &input);
        }
    }
}
