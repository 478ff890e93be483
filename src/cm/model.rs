//! MIM CM REST objects as the server sends them: PascalCase names, unknown fields ignored,
//! enum numbers kept next to their names.

use serde::{Deserialize, Serialize};

/// `Microsoft.Clm.Shared.Smartcards.Smartcard`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Smartcard {
    pub uuid: String,
    pub status: i64,
    pub flags: i64,
    pub assigned_user_uuid: Option<String>,
    pub profile_template_uuid: Option<String>,
    pub profile_template_version: Option<i64>,
    pub serial_number: Option<String>,
    pub atr: Option<String>,
    pub middleware: Option<String>,
    pub comment: Option<String>,
}

/// `Microsoft.Clm.Shared.Certificates.X509ClmCertificate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct X509ClmCertificate {
    pub is_key_history: bool,
    pub archived_on_ca: bool,
    pub certificate_type: i64,
    pub template_common_name: Option<String>,
    pub serial_number: Option<String>,
    pub thumbprint: String,
}

/// A CM request (`GET requests/{id}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Request {
    pub uuid: String,
    pub request_type: i64,
    pub status: i64,
    pub comment: Option<String>,
    pub submitted: Option<String>,
    pub completed: Option<String>,
    pub old_smartcard_uuid: Option<String>,
    pub new_smartcard_uuid: Option<String>,
}

/// Body of `POST requests` (the server's own lower-case names).
#[derive(Debug, Clone, Serialize)]
pub struct NewRequest {
    #[serde(rename = "type")]
    pub request_type: String,
    pub smartcard: String,
    pub comment: String,
    /// Sent as the empty collection; templates used through the REST API must not collect data.
    pub datacollection: Vec<serde_json::Value>,
}

/// SmartcardStatus. Numbers 0–3 are documented (SQL API), Retired = 6 is what the REST example
/// shows; others are reported by number.
pub fn smartcard_status_name(status: i64) -> String {
    match status {
        0 => "New".into(),
        1 => "Assigned".into(),
        2 => "Active".into(),
        3 => "Disabled".into(),
        6 => "Retired".into(),
        n => format!("Status {n}"),
    }
}

/// The SmartcardStatus number of an active card.
pub const STATUS_ACTIVE: i64 = 2;

/// A MIM CM request's status (the RequestStatus numbers of the SQL API's `externalGetStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    None,
    Approved,
    Denied,
    Completed,
    Failed,
    Pending,
    Canceled,
    Executing,
    /// A number this version does not know: still in the server's hands, as far as we know.
    Other(i64),
}

impl RequestStatus {
    pub fn from_code(code: i64) -> RequestStatus {
        match code {
            0 => RequestStatus::None,
            3 => RequestStatus::Approved,
            4 => RequestStatus::Denied,
            8 => RequestStatus::Completed,
            9 => RequestStatus::Failed,
            16 => RequestStatus::Pending,
            17 => RequestStatus::Canceled,
            18 => RequestStatus::Executing,
            n => RequestStatus::Other(n),
        }
    }

    /// The name the CM portal shows (`Status 42` for an unknown number).
    pub fn name(self) -> String {
        match self {
            RequestStatus::None => "None".into(),
            RequestStatus::Approved => "Approved".into(),
            RequestStatus::Denied => "Denied".into(),
            RequestStatus::Completed => "Completed".into(),
            RequestStatus::Failed => "Failed".into(),
            RequestStatus::Pending => "Pending".into(),
            RequestStatus::Canceled => "Canceled".into(),
            RequestStatus::Executing => "Executing".into(),
            RequestStatus::Other(n) => format!("Status {n}"),
        }
    }

    /// Where the request stands for the outbox: carried out, ended without being carried out,
    /// or still in the server's workflow.
    pub fn progress(self) -> RequestProgress {
        match self {
            RequestStatus::Completed => RequestProgress::Completed,
            RequestStatus::Denied | RequestStatus::Failed | RequestStatus::Canceled => {
                RequestProgress::Ended
            }
            _ => RequestProgress::Open,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestProgress {
    Completed,
    Ended,
    Open,
}

/// The name of a RequestStatus number.
pub fn request_status_name(status: i64) -> String {
    RequestStatus::from_code(status).name()
}

/// Normalises a GUID as the server writes it (`{D1EF6869-…}`, any case) to bare lower case.
pub fn normalize_guid(text: &str) -> String {
    text.trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .to_ascii_lowercase()
}

/// Normalises hex from the server (lower-case ATRs, spaced thumbprints) to bare upper case.
pub fn normalize_hex(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_statuses_say_where_a_request_stands() {
        use RequestProgress::*;
        for (code, name, progress) in [
            (8, "Completed", Completed),
            (4, "Denied", Ended),
            (9, "Failed", Ended),
            (17, "Canceled", Ended),
            (16, "Pending", Open),
            (3, "Approved", Open),
            (18, "Executing", Open),
            (42, "Status 42", Open),
        ] {
            let status = RequestStatus::from_code(code);
            assert_eq!(
                (status.name().as_str(), status.progress()),
                (name, progress),
                "{code}"
            );
        }
    }

    #[test]
    fn parses_the_documented_example_and_ignores_unknown_fields() {
        let json = r#"{"Uuid":"438d1b30-f3b4-4bed-85fa-285e08605ba7","Status":3,"Flags":1,
            "ParentSmartcardUuid":"00000000-0000-0000-0000-000000000000",
            "AssignedUserUuid":"8f1590dc-d932-4b66-8e68-2e91c5880780",
            "ProfileTemplateUuid":"a039b4d0-5ce8-4eff-8651-181c6576fda3","ProfileTemplateVersion":46,
            "Comment":"","SerialNumber":"{d1ef6869-5517-42a0-8f05-16ca1a0b834d}",
            "Middleware":"MSBaseCSP","Atr":"3b8d0180fba000000397425446590301c8","SomethingNew":true}"#;
        let card: Smartcard = serde_json::from_str(json).unwrap();
        assert_eq!(card.status, 3);
        assert_eq!(smartcard_status_name(card.status), "Disabled");
        assert_eq!(
            normalize_guid(card.serial_number.as_deref().unwrap()),
            "d1ef6869-5517-42a0-8f05-16ca1a0b834d"
        );
        assert_eq!(
            normalize_hex(card.atr.as_deref().unwrap()),
            "3B8D0180FBA000000397425446590301C8"
        );
    }

    #[test]
    fn certificate_fields() {
        let json = r#"{"IsKeyHistory":false,"ArchivedOnCa":false,"CertificateType":1,
            "TemplateCommonName":"ContosoVirtualSmartCardLimitedRelease-KSP",
            "SerialNumber":"1B0000B01052AFA01313FB77AC00010000B010",
            "Thumbprint":"C52B0C5FB8AAD31A5B239FF2712ED14122D67D30"}"#;
        let cert: X509ClmCertificate = serde_json::from_str(json).unwrap();
        assert!(!cert.is_key_history);
        assert_eq!(cert.thumbprint, "C52B0C5FB8AAD31A5B239FF2712ED14122D67D30");
        assert_eq!(request_status_name(8), "Completed");
    }
}
