//! Certificate serial numbers, compared as the integers they are.
//!
//! A serial number is a positive DER INTEGER, so its hex may start with a `00` sign byte (when
//! the top bit of the first real byte is set): `00D5D4…` and `D5D4…` are the same serial. A
//! card's certificate gives the DER form; SCEPman and MIM CM may list either; people paste
//! serials with colons or spaces, in either case. Everything that compares a serial or sends one
//! to a server goes through [`Serial`], whose one form is the integer's canonical hex: upper
//! case, no separators, no leading zeros.

use std::fmt;

use thiserror::Error;

/// RFC 5280 allows 20 octets; some CAs write more. Past this it is not a serial number.
const MAX_DIGITS: usize = 128;

/// A serial number in canonical form. Two `Serial`s are equal exactly when the integers are.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(String);

/// Why text is not a serial number.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SerialError {
    #[error("a serial number needs at least one hex digit")]
    Empty,
    #[error("a serial number is hex digits (colons or spaces between them allowed), not {0:?}")]
    NotHex(char),
    #[error("a serial number of {0} hex digits is longer than any certificate's")]
    TooLong(usize),
}

impl Serial {
    /// Reads hex digits in either case, with `:` or spaces between them, with or without
    /// leading zeros.
    pub fn parse(text: &str) -> Result<Serial, SerialError> {
        let digits: String = text.chars().filter(|c| !matches!(c, ':' | ' ')).collect();
        if let Some(bad) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(SerialError::NotHex(bad));
        }
        if digits.is_empty() {
            return Err(SerialError::Empty);
        }
        if digits.len() > MAX_DIGITS {
            return Err(SerialError::TooLong(digits.len()));
        }
        let significant = digits.trim_start_matches('0');
        let canonical = if significant.is_empty() {
            "0"
        } else {
            significant
        };
        Ok(Serial(canonical.to_ascii_uppercase()))
    }

    /// Whether `text`, in any of the forms [`Serial::parse`] reads, is this serial.
    pub fn matches(&self, text: &str) -> bool {
        Serial::parse(text).is_ok_and(|other| other == *self)
    }

    /// The canonical hex: what cardbridge searches SCEPman with and revokes by.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_one_integer_is_one_serial() {
        let want = Serial::parse("D5D4A1").unwrap();
        for form in [
            "00D5D4A1",
            "d5d4a1",
            "00:d5:d4:a1",
            "D5 D4 A1",
            "0000D5D4A1",
        ] {
            assert_eq!(Serial::parse(form).unwrap(), want, "{form}");
            assert!(want.matches(form), "{form}");
        }
        assert_eq!(want.as_str(), "D5D4A1");
        assert_eq!(Serial::parse("7a2b").unwrap().to_string(), "7A2B");
        assert_eq!(Serial::parse("00").unwrap().as_str(), "0");
        assert!(!want.matches("D5D4A10"));
        assert!(!want.matches("1D5D4A1"));
    }

    #[test]
    fn what_is_not_a_serial_is_refused_with_a_reason() {
        assert_eq!(Serial::parse(""), Err(SerialError::Empty));
        assert_eq!(Serial::parse(" : "), Err(SerialError::Empty));
        assert_eq!(Serial::parse("12G4"), Err(SerialError::NotHex('G')));
        assert_eq!(Serial::parse("0x12"), Err(SerialError::NotHex('x')));
        assert_eq!(
            Serial::parse(&"1".repeat(129)),
            Err(SerialError::TooLong(129))
        );
    }
}
