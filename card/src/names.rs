//! Card names from the system's pcsc-tools list (`/usr/share/pcsc/smartcard_list.txt`).
//!
//! The list is GPL-licensed and updated by the distribution, so it is read at run time (by the
//! PC/SC side, `pcsc::reader`: this module only matches bytes) and never shipped with
//! cardbridge. Its format: an ATR pattern line (upper-case hex bytes separated by
//! spaces, `..` for any byte, other regular-expression syntax allowed), then description lines
//! that start with a TAB, then an empty line.
//!
//! Two thirds of the ~10,000 patterns are plain bytes and `..`; those are matched byte by byte
//! without allocating. The others are compiled as regular expressions only once their literal
//! start matched the ATR, which keeps a lookup near a millisecond instead of compiling
//! thousands of expressions.
//!
//! The list is read line by line at each lookup, never whole: it is half a megabyte, and a
//! station that read it whole for every card read held a block of that size each time
//! (README, "Robustness"). A lookup holds one line at a time, and reads at most
//! [`MAX_LIST_BYTES`] of a list that has grown or been damaged.

use std::io::{BufRead, Read};

use regex::Regex;

/// Where Debian, Ubuntu and Fedora install the list.
pub const SYSTEM_LIST: &str = "/usr/share/pcsc/smartcard_list.txt";

/// The most of a list a lookup reads: sixteen times the size of Debian 12's (483,831 bytes).
pub const MAX_LIST_BYTES: u64 = 8 << 20;

/// The longest line a lookup keeps; a longer one is skipped. The list's longest is a few
/// hundred bytes.
pub const MAX_LINE: usize = 4096;

/// Looks `atr` up in a list. The list is mostly ASCII with a few Latin-1 or UTF-8
/// descriptions, so it is scanned as bytes and only the description found is decoded. A read
/// error ends the lookup as the end of the list does.
pub fn lookup_in(list: impl BufRead, atr: &[u8]) -> Option<String> {
    let spaced = atr
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut lines = Lines {
        input: list.take(MAX_LIST_BYTES),
        line: Vec::new(),
    };
    while let Some(line) = lines.next() {
        if !matches!(line.first(), Some(b'0'..=b'9' | b'A'..=b'F' | b'a'..=b'f')) {
            continue;
        }
        let Ok(pattern) = std::str::from_utf8(line) else {
            continue;
        };
        if pattern_matches(pattern.trim_end(), atr, &spaced) {
            // The first description line after the pattern (possibly after further patterns).
            while let Some(line) = lines.next() {
                if line.first() == Some(&b'\t') {
                    return Some(String::from_utf8_lossy(line).trim().to_string());
                }
            }
            return None;
        }
    }
    None
}

/// The lines of a list, one at a time in a buffer of at most [`MAX_LINE`] bytes.
struct Lines<R> {
    input: R,
    line: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    /// The next line without its newline; `None` at the end of the input or on a read error.
    fn next(&mut self) -> Option<&[u8]> {
        loop {
            self.line.clear();
            let limit = MAX_LINE as u64 + 1;
            let read = Read::take(&mut self.input, limit)
                .read_until(b'\n', &mut self.line)
                .ok()?;
            if read == 0 {
                return None;
            }
            if self.line.last() == Some(&b'\n') {
                self.line.pop();
                return Some(&self.line);
            }
            if self.line.len() <= MAX_LINE {
                // The last line, without a newline.
                return Some(&self.line);
            }
            // Too long: skip the rest of it.
            self.input.skip_until(b'\n').ok()?;
        }
    }
}

fn pattern_matches(pattern: &str, atr: &[u8], spaced: &str) -> bool {
    // Walk the pattern's tokens against the ATR's bytes without allocating: most lines are
    // rejected at their first or second byte.
    let mut tokens = pattern.split(' ');
    let mut bytes = atr.iter();
    // Every ATR pattern starts with its TS byte; a line that does not is stray text in the list.
    if !tokens.clone().next().is_some_and(is_hex_byte) {
        return false;
    }
    loop {
        match (tokens.next(), bytes.next()) {
            (None, None) => return true,
            (Some(".."), Some(_)) => {}
            (Some(t), Some(b)) if is_hex_byte(t) => {
                if u8::from_str_radix(t, 16).ok() != Some(*b) {
                    return false;
                }
            }
            (Some(t), _) if !is_hex_byte(t) && t != ".." => break,
            // The pattern is longer or shorter than the ATR, and plain from here on.
            _ => return false,
        }
    }
    // A regular-expression pattern whose literal start matched: compile it now.
    Regex::new(&format!("(?i)^(?:{pattern})$")).is_ok_and(|re| re.is_match(spaced))
}

fn is_hex_byte(token: &str) -> bool {
    token.len() == 2 && token.bytes().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &[u8] = b"# comment\n\
3B 8D 01 80 FB A0 00 00 03 97 42 54 46 59 04 01 CF\n\
\tMicrosoft Virtual Smart Card\n\
\n\
3B FD 13 00 00 81 31 FE 15 80 73 C0 21 C0 57 59 75 62 69 4B 65 79 40\n\
3B FD 13 00 00 81 31 FE 45 80 73 C0 21 C0 57 59 75 62 69 4B 65 79 10\n\
\tYubikey 5 NFC (PIV)\n\
\thttps://www.yubico.com/\n\
\n\
3B 80 80 01 ..\n\
\tVirtual card with any check byte\n\
\n\
3B 8[0-9] 80 01 (..)*\n\
\tContactless pseudo ATR\n";

    fn atr(hex: &str) -> Vec<u8> {
        hex::decode(hex.replace(' ', "")).unwrap()
    }

    #[test]
    fn finds_exact_wildcard_and_regex_entries() {
        assert_eq!(
            lookup_in(
                LIST,
                &atr("3B FD 13 00 00 81 31 FE 15 80 73 C0 21 C0 57 59 75 62 69 4B 65 79 40")
            )
            .as_deref(),
            Some("Yubikey 5 NFC (PIV)")
        );
        assert_eq!(
            lookup_in(LIST, &atr("3B 80 80 01 7F")).as_deref(),
            Some("Virtual card with any check byte")
        );
        assert_eq!(
            lookup_in(LIST, &atr("3B 85 80 01 11 22 33 44 55")).as_deref(),
            Some("Contactless pseudo ATR")
        );
        assert_eq!(lookup_in(LIST, &atr("3B 02 14 50")), None);
    }

    #[test]
    fn a_line_longer_than_the_bound_is_skipped() {
        // Kept, even cut at the bound, this line would match: trailing blanks are trimmed.
        let mut list = b"3B 80 80 01 7F".to_vec();
        list.extend(std::iter::repeat_n(b' ', MAX_LINE));
        list.extend(b"\n\tOverlong\n\n");
        list.extend(LIST);
        assert_eq!(
            lookup_in(list.as_slice(), &atr("3B 80 80 01 7F")).as_deref(),
            Some("Virtual card with any check byte")
        );
    }

    #[test]
    fn nothing_past_the_bound_is_read() {
        let mut list = vec![b'#'; MAX_LIST_BYTES as usize - 1];
        list.extend(b"\n3B 80 80 01 7F\n\tPast the bound\n");
        assert_eq!(lookup_in(list.as_slice(), &atr("3B 80 80 01 7F")), None);
    }
}
