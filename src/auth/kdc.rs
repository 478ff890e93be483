//! Where the realm's KDCs are, from the Kerberos configuration, so a message can name them and
//! an expired ticket can be told apart from a KDC that no longer answers.
//!
//! Only what a message needs is read from `krb5.conf` (the files `KRB5_CONFIG` names, else
//! `/etc/krb5.conf`): `default_realm` and each realm's `kdc` lines. A realm whose KDCs come from
//! DNS has none, and then nothing is claimed about them.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long one KDC gets to accept a connection when asked whether it answers.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// KDCs probed at most (a realm lists a few).
const MAX_PROBED: usize = 3;

/// The configuration files, in the order MIT reads them.
fn config_files() -> Vec<String> {
    match std::env::var("KRB5_CONFIG") {
        Ok(list) if !list.is_empty() => list.split(':').map(str::to_string).collect(),
        _ => vec!["/etc/krb5.conf".into()],
    }
}

fn config_text() -> String {
    config_files()
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `[libdefaults] default_realm`.
pub fn default_realm() -> Option<String> {
    parse_default_realm(&config_text())
}

/// The `kdc` entries of `realm` (`host` or `host:port`), as configured.
pub fn addresses(realm: &str) -> Vec<String> {
    parse_addresses(&config_text(), realm)
}

/// Whether any configured KDC of `realm` accepts a TCP connection on its port (88 unless
/// given). With no KDC configured (DNS), the answer is yes: nothing is known against it.
pub fn answers(realm: &str) -> bool {
    let kdcs = addresses(realm);
    if kdcs.is_empty() {
        return true;
    }
    kdcs.iter().take(MAX_PROBED).any(|kdc| {
        let with_port = if kdc.contains(':') {
            kdc.clone()
        } else {
            format!("{kdc}:88")
        };
        with_port
            .to_socket_addrs()
            .into_iter()
            .flatten()
            .any(|addr| TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok())
    })
}

fn parse_default_realm(text: &str) -> Option<String> {
    let mut section = String::new();
    for line in lines(text) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
        } else if section == "libdefaults" {
            if let Some(("default_realm", value)) = key_value(line) {
                return Some(value.to_string());
            }
        }
    }
    None
}

fn parse_addresses(text: &str, realm: &str) -> Vec<String> {
    let mut section = String::new();
    let mut in_realm = false;
    let mut out = Vec::new();
    for line in lines(text) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            in_realm = false;
        } else if section != "realms" {
            continue;
        } else if line.starts_with('}') {
            in_realm = false;
        } else if let Some((name, "{")) = key_value(line) {
            in_realm = name == realm;
        } else if let (true, Some(("kdc", value))) = (in_realm, key_value(line)) {
            out.push(value.to_string());
        }
    }
    out
}

/// Lines without comments and surrounding blanks.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
}

fn key_value(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once('=')?;
    Some((key.trim(), value.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "\
[libdefaults]
 default_realm = CONTOSO.COM
 # a comment
[realms]
 FABRIKAM.COM = {
  kdc = dc9.fabrikam.com
 }
 CONTOSO.COM = {
  kdc = dc1.contoso.com
  kdc = 10.0.0.2:88
  admin_server = dc1.contoso.com
 }
[domain_realm]
 kdc = not.a.kdc
";

    #[test]
    fn reads_the_default_realm_and_each_realms_kdcs() {
        assert_eq!(parse_default_realm(CONF).as_deref(), Some("CONTOSO.COM"));
        assert_eq!(
            parse_addresses(CONF, "CONTOSO.COM"),
            ["dc1.contoso.com", "10.0.0.2:88"]
        );
        assert_eq!(parse_addresses(CONF, "FABRIKAM.COM"), ["dc9.fabrikam.com"]);
        assert!(parse_addresses(CONF, "OTHER").is_empty());
        assert_eq!(parse_default_realm("[realms]\n"), None);
    }
}
