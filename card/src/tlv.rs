//! BER-TLV as PIV and GIDS use it (ISO/IEC 7816-4 §5.2 / X.690 subset).
//!
//! Lengths come from the card and are never trusted: every element is checked against the bytes
//! actually present before it is sliced, so a length field that claims gigabytes is an error, not
//! an allocation.

use thiserror::Error;

/// Why a TLV structure could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TlvError {
    #[error("TLV truncated: {0}")]
    Truncated(&'static str),
    #[error("TLV element {tag:X} claims {claimed} bytes but only {available} remain")]
    LengthOverrun {
        tag: u32,
        claimed: u64,
        available: usize,
    },
    #[error("TLV tag longer than 3 bytes")]
    TagTooLong,
    #[error("TLV length field of {0} bytes is not supported")]
    LengthTooLong(usize),
}

/// One element: its tag (the tag bytes read as a big-endian number, e.g. `0x5FC105`) and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    pub tag: u32,
    pub value: &'a [u8],
}

/// Iterates over the elements of a concatenation of TLVs. Padding bytes `00` and `FF` between
/// elements are skipped, as ISO 7816-4 allows.
pub struct TlvIter<'a> {
    rest: &'a [u8],
}

/// Parses `data` as a sequence of BER-TLV elements.
pub fn iter(data: &[u8]) -> TlvIter<'_> {
    TlvIter { rest: data }
}

/// Returns the value of the first element with `tag`, or `None`; a malformed sequence before it is
/// an error.
pub fn find(data: &[u8], tag: u32) -> Result<Option<&[u8]>, TlvError> {
    for tlv in iter(data) {
        let tlv = tlv?;
        if tlv.tag == tag {
            return Ok(Some(tlv.value));
        }
    }
    Ok(None)
}

/// Parses the first element of `data`; what follows it is ignored (cards may pad responses).
pub fn single(data: &[u8]) -> Result<Tlv<'_>, TlvError> {
    let mut it = iter(data);
    let first = it.next().ok_or(TlvError::Truncated("no element"))??;
    Ok(first)
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = Result<Tlv<'a>, TlvError>;

    fn next(&mut self) -> Option<Self::Item> {
        while let Some((&b, tail)) = self.rest.split_first() {
            if b == 0x00 || b == 0xFF {
                self.rest = tail;
            } else {
                break;
            }
        }
        if self.rest.is_empty() {
            return None;
        }
        match read_one(self.rest) {
            Ok((tlv, rest)) => {
                self.rest = rest;
                Some(Ok(tlv))
            }
            Err(e) => {
                // Stop after the first error: the remaining bytes have no reliable framing.
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

fn read_one(data: &[u8]) -> Result<(Tlv<'_>, &[u8]), TlvError> {
    let (tag, rest) = read_tag(data)?;
    let (len, rest) = read_len(rest)?;
    if len > rest.len() as u64 {
        return Err(TlvError::LengthOverrun {
            tag,
            claimed: len,
            available: rest.len(),
        });
    }
    // `len <= rest.len()`, so it fits in usize.
    let (value, rest) = rest.split_at(len as usize);
    Ok((Tlv { tag, value }, rest))
}

fn read_tag(data: &[u8]) -> Result<(u32, &[u8]), TlvError> {
    let (&first, mut rest) = data.split_first().ok_or(TlvError::Truncated("tag"))?;
    let mut tag = u32::from(first);
    if first & 0x1F == 0x1F {
        // Subsequent tag bytes follow while bit 8 is set.
        let mut count = 1;
        loop {
            let (&b, tail) = rest.split_first().ok_or(TlvError::Truncated("tag"))?;
            rest = tail;
            count += 1;
            if count > 3 {
                return Err(TlvError::TagTooLong);
            }
            tag = (tag << 8) | u32::from(b);
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    Ok((tag, rest))
}

fn read_len(data: &[u8]) -> Result<(u64, &[u8]), TlvError> {
    let (&first, rest) = data.split_first().ok_or(TlvError::Truncated("length"))?;
    if first < 0x80 {
        return Ok((u64::from(first), rest));
    }
    let n = usize::from(first & 0x7F);
    if n == 0 || n > 4 {
        return Err(TlvError::LengthTooLong(n));
    }
    if rest.len() < n {
        return Err(TlvError::Truncated("length"));
    }
    let len = rest[..n]
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    Ok((len, &rest[n..]))
}

/// Encodes a BER length (used to build commands and, in tests, card objects).
pub fn encode_len(len: usize, out: &mut Vec<u8>) {
    match len {
        0..=0x7F => out.push(len as u8),
        0x80..=0xFF => out.extend_from_slice(&[0x81, len as u8]),
        0x100..=0xFFFF => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
        _ => out.extend_from_slice(&[0x83, (len >> 16) as u8, (len >> 8) as u8, len as u8]),
    }
}

/// Encodes one element with a tag of one to three bytes.
pub fn encode(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 8);
    let tag_bytes = tag.to_be_bytes();
    let skip = tag_bytes.iter().take_while(|&&b| b == 0).count().min(3);
    out.extend_from_slice(&tag_bytes[skip..]);
    encode_len(value.len(), &mut out);
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_short_long_and_multibyte_tags() {
        let mut data = encode(0x5FC105, &[1, 2, 3]);
        data.extend(encode(0x70, &vec![0xAB; 300]));
        data.extend([0x00, 0xFF]);
        data.extend(encode(0x7F61, &[]));
        let items: Vec<_> = iter(&data).collect::<Result<_, _>>().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].tag, 0x5FC105);
        assert_eq!(items[0].value, &[1, 2, 3]);
        assert_eq!(items[1].tag, 0x70);
        assert_eq!(items[1].value.len(), 300);
        assert_eq!(items[2].tag, 0x7F61);
        assert!(items[2].value.is_empty());
    }

    #[test]
    fn a_length_claiming_gigabytes_is_an_error() {
        let data = [0x53, 0x84, 0x7F, 0xFF, 0xFF, 0xFF, 0x01];
        let err = single(&data).unwrap_err();
        assert!(matches!(
            err,
            TlvError::LengthOverrun {
                claimed: 0x7FFF_FFFF,
                ..
            }
        ));
    }

    #[test]
    fn truncated_inputs_are_errors() {
        assert_eq!(single(&[0x5F]).unwrap_err(), TlvError::Truncated("tag"));
        assert_eq!(single(&[0x53]).unwrap_err(), TlvError::Truncated("length"));
        assert_eq!(
            single(&[0x53, 0x82, 0x01]).unwrap_err(),
            TlvError::Truncated("length")
        );
        assert_eq!(
            single(&[0x5F, 0xC1, 0x82, 0x81]).unwrap_err(),
            TlvError::TagTooLong
        );
        assert_eq!(
            single(&[0x53, 0x80]).unwrap_err(),
            TlvError::LengthTooLong(0)
        );
    }

    #[test]
    fn find_stops_at_malformed_data() {
        let mut data = encode(0x30, &[0; 25]);
        data.extend([0x34, 0x10, 1, 2]);
        assert_eq!(find(&data, 0x30).unwrap().map(<[u8]>::len), Some(25));
        assert!(find(&data, 0x34).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            for tlv in iter(&data).flatten() {
                proptest::prop_assert!(tlv.value.len() <= data.len());
            }
        }

        #[test]
        fn roundtrips(tag in proptest::sample::select(vec![0x53u32, 0x70, 0x5FC10A, 0x7F61, 0xDF1F]),
                      value in proptest::collection::vec(proptest::num::u8::ANY, 0..1000)) {
            let encoded = encode(tag, &value);
            let tlv = single(&encoded).unwrap();
            proptest::prop_assert_eq!(tlv.tag, tag);
            proptest::prop_assert_eq!(tlv.value, &value[..]);
        }
    }
}
