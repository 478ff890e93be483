//! The I/O of a reconciliation: finding the card on MIM CM (both byte orders of the card id,
//! or an earlier id of the same card), fetching its certificates and operations, and asking
//! SCEPman at the same time.

use std::sync::Mutex;

use time::OffsetDateTime;

use super::history;
use super::{card_id_forms, reconcile, scepman, CardIdForm, Lookup, Reconciliation, ServerData};
use crate::card::Card;
use crate::cm::model::normalize_guid;
use crate::cm::CmClient;
use crate::config::CardIdOrder;
use crate::http::ServerError;

/// Asks the server about a card. With `auto` order, the form the server answered to last time is
/// tried first (it is the same for every card of one deployment).
pub struct Reconciler {
    client: Option<CmClient>,
    order: CardIdOrder,
    preferred_form: Mutex<Option<CardIdForm>>,
    scepman: Option<scepman::StatusLookup>,
}

impl Reconciler {
    /// The reconciler of a configuration: a CM client when `[cm]` is set (else every card is
    /// `not_configured`), a SCEPman status lookup when `[scepman]` is, and the card-id form a
    /// previous run learnt, if any.
    pub fn configured(
        config: &crate::config::Config,
        learnt_form: Option<String>,
    ) -> Result<Reconciler, ServerError> {
        let mut reconciler = match &config.cm {
            Some(cm) => Reconciler::new(
                Some(CmClient::new(cm)?),
                cm.card_id_order.unwrap_or_default(),
            ),
            None => Reconciler::new(None, CardIdOrder::default()),
        };
        if let Some(s) = &config.scepman {
            reconciler.scepman = Some(scepman::StatusLookup::new(
                crate::scepman::ScepmanClient::new(s)?,
                s.status_cache(),
            ));
        }
        if let Some(form) = learnt_form {
            reconciler.prefer_form(&form);
        }
        Ok(reconciler)
    }

    pub fn new(client: Option<CmClient>, order: CardIdOrder) -> Reconciler {
        Reconciler {
            client,
            order,
            preferred_form: Mutex::new(None),
            scepman: None,
        }
    }

    /// The servers' clients, for the revocation outbox: sharing them means one OAuth token and
    /// one Kerberos context per server for the whole station.
    pub fn clients(&self) -> (Option<CmClient>, Option<crate::scepman::ScepmanClient>) {
        (
            self.client.clone(),
            self.scepman.as_ref().map(|s| s.client().clone()),
        )
    }

    /// Remembers a form learnt earlier (from the store).
    pub fn prefer_form(&self, form: &str) {
        let known = CardIdForm::parse(form);
        *self
            .preferred_form
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = known;
    }

    pub fn preferred_form(&self) -> Option<CardIdForm> {
        *self
            .preferred_form
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Looks the card up on both servers at once and applies the rules. `fresh` asks SCEPman
    /// again instead of using answers it gave recently (a sync, or after a revocation).
    /// `history` is what the station's store knows: the previous reconciliation gives
    /// `last_known` while the server is unreachable, and the earlier cards that resemble this
    /// one link it to its earlier self when the server knows neither form of its id, or it has
    /// none.
    pub async fn reconcile(
        &self,
        card: &Card,
        fresh: bool,
        history: &history::History,
    ) -> Reconciliation {
        let mut r = self.compare(card, fresh, &history.earlier).await;
        history::carry_last_known(&mut r, history.previous.as_ref());
        r
    }

    async fn compare(
        &self,
        card: &Card,
        fresh: bool,
        earlier: &[history::Remembered],
    ) -> Reconciliation {
        let scepman = async {
            match &self.scepman {
                Some(s) => s.answers(card, fresh).await,
                None => scepman::Answers::new(),
            }
        };
        let (lookup, answers) = tokio::join!(self.lookup(card), scepman);
        let now = OffsetDateTime::now_utc();
        let Some(before) = earlier.first() else {
            return reconcile(card, &lookup, &answers, now);
        };
        match lookup {
            Lookup::NoCardId => {
                let mut r = reconcile(card, &lookup, &answers, now);
                r.earlier_card = Some(before.evidence(card));
                r
            }
            Lookup::NotFound => self.by_earlier_id(card, before, &answers, now).await,
            _ => reconcile(card, &lookup, &answers, now),
        }
    }

    /// Asks the server with the id an earlier card was matched by; when it answers, the card is
    /// compared with that record and `card_id_changed` says so.
    async fn by_earlier_id(
        &self,
        card: &Card,
        before: &history::Remembered,
        answers: &scepman::Answers,
        now: OffsetDateTime,
    ) -> Reconciliation {
        let old = &before.reconciliation;
        let form = old.card_id_form.unwrap_or_default();
        let text = old
            .server_card
            .as_ref()
            .and_then(|s| s.serial_number.as_deref())
            .map(normalize_guid);
        let lookup = match (&self.client, text) {
            (Some(client), Some(text)) => match find(client, &text).await {
                Ok(Some(smartcard)) => fetch(client, smartcard, form).await,
                Ok(None) => Lookup::NotFound,
                Err(e) => Lookup::Unavailable(e),
            },
            _ => Lookup::NotFound,
        };
        let found = matches!(lookup, Lookup::Found(_));
        let mut r = reconcile(card, &lookup, answers, now);
        if found {
            history::note_changed_id(&mut r, before.evidence(card));
        }
        r
    }

    pub async fn lookup(&self, card: &Card) -> Lookup {
        let Some(client) = &self.client else {
            return Lookup::NotConfigured;
        };
        let Some(id) = card
            .card_id
            .as_deref()
            .and_then(|hex| hex::decode(hex).ok())
            .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
            .filter(|id| *id != [0; 16])
        else {
            // No id, or an all-zero GUID: Windows' derivation is unknown then, so none is guessed.
            return Lookup::NoCardId;
        };
        let mut forms = card_id_forms(&id, self.order);
        if let Some(preferred) = self.preferred_form() {
            forms.sort_by_key(|(name, _)| *name != preferred);
        }
        for (form, text) in forms {
            let smartcard = match find(client, &text).await {
                Ok(Some(smartcard)) => smartcard,
                Ok(None) => continue,
                Err(e) => return Lookup::Unavailable(e),
            };
            *self
                .preferred_form
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(form);
            return fetch(client, smartcard, form).await;
        }
        Lookup::NotFound
    }
}

/// The smart card the server records under exactly this id string. The server may answer with
/// cards of other ids on a loose match: only an exact one counts.
async fn find(client: &CmClient, text: &str) -> Result<Option<crate::cm::Smartcard>, ServerError> {
    let found = client.find_smartcards(text).await?;
    Ok(found
        .into_iter()
        .find(|s| s.serial_number.as_deref().map(normalize_guid).as_deref() == Some(text)))
}

/// A found card's certificates and operations, one after the other on the same kept-alive
/// connection: fetching both at once would open a second connection, and a TLS handshake to a
/// remote CM costs more than the round trip it saves.
async fn fetch(client: &CmClient, smartcard: crate::cm::Smartcard, form: CardIdForm) -> Lookup {
    let uuid = normalize_guid(&smartcard.uuid);
    let certificates = match client.certificates(&uuid).await {
        Ok(certificates) => certificates,
        Err(e) => return Lookup::Unavailable(e),
    };
    let operations = match client.operations(&uuid).await {
        Ok(operations) => operations,
        Err(e) => return Lookup::Unavailable(e),
    };
    Lookup::Found(Box::new(ServerData {
        smartcard,
        certificates,
        operations,
        card_id_form: form,
    }))
}
