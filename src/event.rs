//! What happens at the station, as one typed event: the engine produces most of them, the
//! outbox `revocation.updated`. The daemon updates its station state and metrics from the
//! variants, logs them with typed fields ([`StationEvent::log`]), and serialises each once, at
//! the edge, for the event bus ([`StationEvent::data`]). Nothing re-parses JSON it has written.

use serde::Serialize;
use serde_json::json;

use crate::card::Card;
use crate::reconcile::Reconciliation;
use crate::revoke::Revocation;

#[derive(Debug, Clone)]
pub enum StationEvent {
    ReaderAdded {
        reader: String,
    },
    ReaderRemoved {
        reader: String,
    },
    CardInserted {
        reader: String,
        atr: String,
    },
    CardRemoved {
        reader: String,
    },
    CardRead(Box<Card>),
    CardReadFailed(Box<Card>),
    CardReconciled(Box<Reconciliation>),
    PcscUnavailable {
        reason: String,
        /// pcscd refused this user (polkit), which a log line must name.
        access_denied: bool,
    },
    PcscRestored,
    RevocationUpdated(Box<Revocation>),
}

impl StationEvent {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            StationEvent::ReaderAdded { .. } => "reader.added",
            StationEvent::ReaderRemoved { .. } => "reader.removed",
            StationEvent::CardInserted { .. } => "card.inserted",
            StationEvent::CardRemoved { .. } => "card.removed",
            StationEvent::CardRead(_) => "card.read",
            StationEvent::CardReadFailed(_) => "card.read_failed",
            StationEvent::CardReconciled(_) => "card.reconciled",
            StationEvent::PcscUnavailable { .. } => "pcsc.unavailable",
            StationEvent::PcscRestored => "pcsc.restored",
            StationEvent::RevocationUpdated(_) => "revocation.updated",
        }
    }

    /// The SSE data: JSON, made here and nowhere else.
    pub fn data(&self) -> String {
        fn text(value: &impl Serialize) -> String {
            // Serialising these types cannot fail (no maps with non-string keys, no custom
            // serialisers that error); "{}" would only hide a bug, never a bad input.
            serde_json::to_string(value).unwrap_or_else(|_| "{}".into())
        }
        match self {
            StationEvent::ReaderAdded { reader }
            | StationEvent::ReaderRemoved { reader }
            | StationEvent::CardRemoved { reader } => json!({ "reader": reader }).to_string(),
            StationEvent::CardInserted { reader, atr } => {
                json!({ "reader": reader, "atr": atr }).to_string()
            }
            StationEvent::CardRead(card) | StationEvent::CardReadFailed(card) => text(card),
            StationEvent::CardReconciled(r) => text(r),
            StationEvent::PcscUnavailable { reason, .. } => json!({ "reason": reason }).to_string(),
            StationEvent::PcscRestored => "{}".into(),
            StationEvent::RevocationUpdated(r) => text(r),
        }
    }

    /// One log line with the event's own fields; a refusal by pcscd names the polkit rule that
    /// fixes it, because otherwise the reader gets the blame.
    pub fn log(&self) {
        let event = self.name();
        match self {
            StationEvent::PcscUnavailable {
                reason,
                access_denied: true,
            } => tracing::error!(
                event,
                "pcscd refused access ({reason}): the service user needs the polkit rule \
                 /usr/share/polkit-1/rules.d/50-cardbridge-pcsc.rules (service/50-cardbridge-pcsc.rules) \
                 granting org.debian.pcsc-lite.access_pcsc and access_card"
            ),
            StationEvent::PcscUnavailable { reason, .. } => {
                tracing::warn!(event, reason = %reason, "pcscd is not reachable; waiting for it")
            }
            StationEvent::CardRead(card) => tracing::info!(
                event,
                reader = %card.reader,
                card_id = %card.card_id.as_deref().unwrap_or("")
            ),
            StationEvent::CardReadFailed(card) => tracing::warn!(
                event,
                reader = %card.reader,
                error = %card.error.as_ref().map_or("", |e| e.code()),
            ),
            StationEvent::CardReconciled(r) => tracing::info!(
                event,
                card_id = %r.card_id.as_deref().unwrap_or(""),
                state = %r.state.as_str(),
                verdict = %r.verdict.as_str(),
            ),
            StationEvent::RevocationUpdated(r) => tracing::info!(
                event,
                revocation = r.id,
                card_id = %r.card_id,
                status = %r.status.as_str(),
            ),
            StationEvent::ReaderAdded { reader }
            | StationEvent::ReaderRemoved { reader }
            | StationEvent::CardInserted { reader, .. }
            | StationEvent::CardRemoved { reader } => tracing::info!(event, reader = %reader),
            StationEvent::PcscRestored => tracing::info!(event),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Captures what `log` writes for one event.
    fn logged(event: &StationEvent) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || event.log());
        let text = String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned();
        text
    }

    #[test]
    fn a_refusal_by_pcscd_names_the_polkit_rule_in_one_line() {
        let line = logged(&StationEvent::PcscUnavailable {
            reason: "Access was denied because of a security violation".into(),
            access_denied: true,
        });
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.contains("ERROR"), "{line}");
        assert!(line.contains("50-cardbridge-pcsc.rules"), "{line}");
        assert!(line.contains("org.debian.pcsc-lite.access_pcsc"), "{line}");
        let line = logged(&StationEvent::PcscUnavailable {
            reason: "Service not available".into(),
            access_denied: false,
        });
        assert!(!line.contains("polkit") && line.contains("WARN"), "{line}");
        let line = logged(&StationEvent::CardInserted {
            reader: "Virtual PCD 00 00".into(),
            atr: "3B".into(),
        });
        assert!(line.contains("reader=Virtual PCD 00 00"), "{line}");
    }

    /// `as_str` is the JSON name: the two cannot drift apart.
    #[test]
    fn every_enum_name_is_its_json_name() {
        use crate::reconcile::{Severity, State, Verdict};
        use crate::revoke::{CardOperation, RevocationStatus, Target};
        fn same<T: Serialize>(value: T, name: &str) {
            assert_eq!(serde_json::to_value(value).unwrap(), name);
        }
        for s in [
            State::Matched,
            State::NotFound,
            State::ServerUnavailable,
            State::NotConfigured,
            State::NoCardId,
        ] {
            same(s, s.as_str());
        }
        for v in [
            Verdict::Ok,
            Verdict::Attention,
            Verdict::Critical,
            Verdict::Unknown,
        ] {
            same(v, v.as_str());
        }
        for s in [Severity::Info, Severity::Warning, Severity::Critical] {
            same(s, s.as_str());
        }
        for s in [
            RevocationStatus::Queued,
            RevocationStatus::InProgress,
            RevocationStatus::Succeeded,
            RevocationStatus::PartiallyFailed,
            RevocationStatus::Failed,
        ] {
            same(s, s.as_str());
        }
        for t in [Target::Certificates, Target::Card] {
            same(t, t.as_str());
            assert_eq!(Target::parse(t.as_str()), Some(t));
        }
        for o in [CardOperation::Revoke, CardOperation::Retire] {
            same(o, o.as_str());
            assert_eq!(CardOperation::parse(o.as_str()), Some(o));
        }
        use crate::revoke::Reason;
        for r in Reason::ALL {
            same(r, r.as_str());
            assert_eq!(Reason::parse(&r.as_str().to_ascii_uppercase()), Some(r));
        }
        let codes: Vec<i64> = Reason::ALL.map(Reason::code).to_vec();
        assert_eq!(
            codes,
            [0, 1, 2, 3, 4, 5, 6, 8, 9, 10],
            "RFC 5280 CRLReason numbers"
        );
        use crate::reconcile::CardIdForm;
        for f in [CardIdForm::Rfc4122, CardIdForm::Windows] {
            same(f, f.as_str());
            assert_eq!(CardIdForm::parse(f.as_str()), Some(f));
        }
        for k in [
            crate::card::CardKind::Piv,
            crate::card::CardKind::Gids,
            crate::card::CardKind::Idprime,
            crate::card::CardKind::Unknown,
        ] {
            same(k, k.as_str());
        }
    }

    #[test]
    fn names_and_data_are_made_from_the_variant() {
        let e = StationEvent::CardInserted {
            reader: "R".into(),
            atr: "3B8D".into(),
        };
        assert_eq!(e.name(), "card.inserted");
        assert_eq!(e.data(), r#"{"atr":"3B8D","reader":"R"}"#);
        assert_eq!(StationEvent::PcscRestored.data(), "{}");
    }
}
