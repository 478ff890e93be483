//! Certificate decompression with a hard output bound.
//!
//! PIV cards mark compressed certificates in CertInfo and use gzip (SP 800-73-4) or, on some
//! older cards, zlib; GIDS uses zlib behind a `01 00` + length header. The method is detected
//! from the stream header, as a card's flag alone is not reliable.

use std::io::Read;

use flate2::read::{GzDecoder, ZlibDecoder};

use super::apdu::MAX_OBJECT_SIZE;
use super::ReadError;

/// Inflates a gzip or zlib stream, refusing output larger than [`MAX_OBJECT_SIZE`].
pub fn inflate(data: &[u8]) -> Result<Vec<u8>, ReadError> {
    let reader: Box<dyn Read + '_> = match data {
        [0x1F, 0x8B, ..] => Box::new(GzDecoder::new(data)),
        [cmf, flg, ..] if cmf & 0x0F == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0 => {
            Box::new(ZlibDecoder::new(data))
        }
        _ => {
            return Err(ReadError::Malformed(
                "compressed certificate is neither gzip nor zlib".into(),
            ))
        }
    };
    let mut out = Vec::new();
    reader
        .take(MAX_OBJECT_SIZE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ReadError::Malformed(format!("compressed certificate is corrupt: {e}")))?;
    if out.len() > MAX_OBJECT_SIZE {
        return Err(ReadError::TooLarge {
            limit: MAX_OBJECT_SIZE,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn inflates_gzip_and_zlib() {
        let data = b"certificate bytes".repeat(20);
        assert_eq!(inflate(&gzip(&data)).unwrap(), data);
        assert_eq!(inflate(&zlib(&data)).unwrap(), data);
    }

    #[test]
    fn refuses_a_decompression_bomb() {
        let bomb = gzip(&vec![0u8; MAX_OBJECT_SIZE * 4]);
        assert!(bomb.len() < 1024);
        assert!(matches!(inflate(&bomb), Err(ReadError::TooLarge { .. })));
    }

    #[test]
    fn refuses_garbage_and_truncation() {
        assert!(matches!(
            inflate(b"\x30\x82garbage"),
            Err(ReadError::Malformed(_))
        ));
        let good = gzip(b"hello world hello world");
        assert!(matches!(
            inflate(&good[..good.len() / 2]),
            Err(ReadError::Malformed(_))
        ));
    }
}
