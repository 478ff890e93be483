//! Card names from the system's pcsc-tools list (`/usr/share/pcsc/smartcard_list.txt`).
//!
//! The list is GPL-licensed and updated by the distribution, so it is read at run time and never
//! shipped with cardbridge. Its format: an ATR pattern line (upper-case hex bytes separated by
//! spaces, `..` for any byte, other regular-expression syntax allowed), then description lines
//! that start with a TAB, then an empty line.
//!
//! About 95% of the patterns are plain bytes and `..`; those are matched byte by byte. Only the
//! others are compiled as regular expressions, and only once their literal prefix matched, which
//! keeps a lookup in the low milliseconds instead of compiling thousands of expressions.

use std::path::Path;

use regex::Regex;

/// Where Debian, Ubuntu and Fedora install the list.
pub const SYSTEM_LIST: &str = "/usr/share/pcsc/smartcard_list.txt";

/// Looks `atr` up in the list at `path`; `None` when the file is absent or the ATR unknown.
pub fn lookup(path: &Path, atr: &[u8]) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    lookup_in(&String::from_utf8_lossy(&text), atr)
}

/// Looks `atr` up in the text of a list.
pub fn lookup_in(list: &str, atr: &[u8]) -> Option<String> {
    let spaced = atr
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut lines = list.lines();
    while let Some(line) = lines.next() {
        if line.is_empty() || line.starts_with('#') || line.starts_with('\t') {
            continue;
        }
        if pattern_matches(line.trim_end(), atr, &spaced) {
            // The first description line after the pattern (possibly after further patterns).
            return lines
                .find(|l| l.starts_with('\t'))
                .map(|l| l.trim().to_string());
        }
    }
    None
}

fn pattern_matches(pattern: &str, atr: &[u8], spaced: &str) -> bool {
    let tokens: Vec<&str> = pattern.split(' ').collect();
    let simple = tokens
        .iter()
        .all(|t| *t == ".." || (t.len() == 2 && t.bytes().all(|c| c.is_ascii_hexdigit())));
    if simple {
        return tokens.len() == atr.len()
            && tokens
                .iter()
                .zip(atr)
                .all(|(t, b)| *t == ".." || u8::from_str_radix(t, 16).is_ok_and(|v| v == *b));
    }
    // Regular-expression pattern: check the literal leading bytes before compiling.
    for (t, b) in tokens.iter().zip(atr) {
        match u8::from_str_radix(t, 16) {
            Ok(v) if t.len() == 2 => {
                if v != *b {
                    return false;
                }
            }
            _ if *t == ".." => {}
            _ => break,
        }
    }
    Regex::new(&format!("(?i)^(?:{pattern})$")).is_ok_and(|re| re.is_match(spaced))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "# comment\n\
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
    fn a_missing_list_is_not_an_error() {
        assert_eq!(
            lookup(Path::new("/nonexistent/smartcard_list.txt"), &[0x3B]),
            None
        );
    }
}
