//! The keytab file, read by cardbridge itself before GSSAPI sees it.
//!
//! GSSAPI turns every keytab problem (another principal's keytab, a name that differs only in
//! case, an empty or garbage file) into "no credentials", which sends an administrator to fix
//! the wrong thing. Reading the principals first lets each of those causes be named. The format
//! is MIT's (version `05 02`, big-endian), which Windows `ktpass`, `adcli` and `msktutil` also
//! write; it is about thirty lines to read, so it is read here rather than through a crate
//! (none that reads keytabs is widely kept).

use thiserror::Error;

/// A keytab larger than this is not one a station holds.
pub const MAX_KEYTAB_SIZE: usize = 1024 * 1024;

/// One key of the keytab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `station03$@CONTOSO.COM`, `HTTP/cm.contoso.com@CONTOSO.COM`.
    pub principal: String,
    pub kvno: u32,
    pub enctype: u16,
}

/// Why bytes are not a keytab.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeytabError {
    #[error("the file is empty")]
    Empty,
    #[error("it does not start with a keytab version (05 02), so it is not a keytab file")]
    NotAKeytab,
    #[error("it is a keytab of version 05 01, which only very old tools write; export it again")]
    OldVersion,
    #[error("entry {entry} is cut short or malformed at byte {offset}")]
    Malformed { entry: usize, offset: usize },
    #[error("the file is larger than {MAX_KEYTAB_SIZE} bytes")]
    TooLarge,
}

/// Reads every entry of a keytab (deleted entries, which MIT leaves as holes, are skipped).
pub fn parse(data: &[u8]) -> Result<Vec<Entry>, KeytabError> {
    if data.len() > MAX_KEYTAB_SIZE {
        return Err(KeytabError::TooLarge);
    }
    match data {
        [] => return Err(KeytabError::Empty),
        [0x05, 0x02, ..] => {}
        [0x05, 0x01, ..] => return Err(KeytabError::OldVersion),
        _ => return Err(KeytabError::NotAKeytab),
    }
    let mut reader = Reader { data, at: 2 };
    let mut entries = Vec::new();
    while reader.at < data.len() {
        let start = reader.at;
        let malformed = KeytabError::Malformed {
            entry: entries.len() + 1,
            offset: start,
        };
        let size = reader.i32().ok_or(malformed.clone())?;
        let len = usize::try_from(size.unsigned_abs()).map_err(|_| malformed.clone())?;
        let body = reader.take(len).ok_or(malformed.clone())?;
        if size > 0 {
            entries.push(entry(body).ok_or(malformed)?);
        }
    }
    Ok(entries)
}

/// One entry: components and realm, name type, timestamp, 8-bit kvno, key, optional 32-bit kvno.
fn entry(body: &[u8]) -> Option<Entry> {
    let mut r = Reader { data: body, at: 0 };
    let components = r.u16()?;
    let realm = r.counted()?;
    let mut names = Vec::with_capacity(usize::from(components).min(16));
    for _ in 0..components {
        names.push(String::from_utf8_lossy(r.counted()?).into_owned());
    }
    let _name_type = r.take(4)?;
    let _timestamp = r.take(4)?;
    let kvno8 = r.take(1)?[0];
    let enctype = r.u16()?;
    let _key = r.counted()?;
    let kvno = match r.take(4) {
        Some(&[a, b, c, d]) if u32::from_be_bytes([a, b, c, d]) != 0 => {
            u32::from_be_bytes([a, b, c, d])
        }
        _ => u32::from(kvno8),
    };
    Some(Entry {
        principal: format!("{}@{}", names.join("/"), String::from_utf8_lossy(realm)),
        kvno,
        enctype,
    })
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let bytes = self.data.get(self.at..end)?;
        self.at = end;
        Some(bytes)
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Option<i32> {
        let b = self.take(4)?;
        Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn counted(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

/// The distinct principals of a keytab, in file order.
pub fn principals(entries: &[Entry]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in entries {
        if !out.contains(&e.principal) {
            out.push(e.principal.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as MIT writes it.
    fn entry_bytes(components: &[&str], realm: &str, kvno: u32) -> Vec<u8> {
        let counted = |s: &[u8]| {
            let mut v = (s.len() as u16).to_be_bytes().to_vec();
            v.extend_from_slice(s);
            v
        };
        let mut body = (components.len() as u16).to_be_bytes().to_vec();
        body.extend(counted(realm.as_bytes()));
        for c in components {
            body.extend(counted(c.as_bytes()));
        }
        body.extend(1u32.to_be_bytes()); // KRB5_NT_PRINCIPAL
        body.extend(1_700_000_000u32.to_be_bytes());
        body.push(kvno as u8);
        body.extend(18u16.to_be_bytes()); // aes256-cts-hmac-sha1-96
        body.extend(counted(&[0xAB; 32]));
        body.extend(kvno.to_be_bytes());
        let mut out = (body.len() as i32).to_be_bytes().to_vec();
        out.extend(body);
        out
    }

    #[test]
    fn reads_principals_and_key_versions_and_skips_holes() {
        let mut kt = vec![0x05, 0x02];
        kt.extend(entry_bytes(&["station03"], "CONTOSO.COM", 3));
        kt.extend((-12i32).to_be_bytes());
        kt.extend([0u8; 12]);
        kt.extend(entry_bytes(&["HTTP", "cm.contoso.com"], "CONTOSO.COM", 300));
        kt.extend(entry_bytes(&["station03"], "CONTOSO.COM", 3));
        let entries = parse(&kt).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].principal, "station03@CONTOSO.COM");
        assert_eq!(entries[1].principal, "HTTP/cm.contoso.com@CONTOSO.COM");
        assert_eq!((entries[1].kvno, entries[1].enctype), (300, 18));
        assert_eq!(
            principals(&entries),
            ["station03@CONTOSO.COM", "HTTP/cm.contoso.com@CONTOSO.COM"]
        );
    }

    #[test]
    fn what_is_not_a_keytab_says_why() {
        assert_eq!(parse(&[]), Err(KeytabError::Empty));
        assert_eq!(parse(&[0x05, 0x02]).unwrap(), []);
        assert_eq!(parse(b"garbage"), Err(KeytabError::NotAKeytab));
        assert_eq!(parse(&[0x05, 0x01, 0, 0]), Err(KeytabError::OldVersion));
        let mut kt = vec![0x05, 0x02];
        kt.extend(entry_bytes(&["station03"], "CONTOSO.COM", 3));
        let cut = kt.len() - 10;
        assert_eq!(
            parse(&kt[..cut]),
            Err(KeytabError::Malformed {
                entry: 1,
                offset: 2
            })
        );
        // A size that claims more than the file holds.
        assert!(parse(&[0x05, 0x02, 0x7F, 0xFF, 0xFF, 0xFF, 0]).is_err());
        assert!(parse(&[0x05, 0x02, 0x80, 0x00, 0x00, 0x00]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut kt = vec![0x05, 0x02];
            kt.extend(&data);
            let _ = parse(&kt);
            let _ = parse(&data);
        }
    }
}
