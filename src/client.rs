//! Client commands (`cardbridge cards`, `events`, `revoke`, `revocations`): talk to a running
//! daemon's local API, so an administrator can look at a station without touching PC/SC.

use std::io::Write;
use std::path::PathBuf;

use thiserror::Error;

use serde_json::Value;

use crate::config::Config;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no API token: give --token-file, set CARDBRIDGE_TOKEN, or let the daemon write {0}")]
    NoToken(PathBuf),
    #[error("cannot reach cardbridge at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("cardbridge answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("unexpected answer from cardbridge: {0}")]
    BadAnswer(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

/// Where the daemon is and how to authenticate to it.
pub struct Target {
    pub url: String,
    /// The bearer token (TCP); none over the Unix socket, where the caller's uid decides.
    pub token: Option<String>,
    /// The daemon's Unix socket, when the command talks through it.
    pub socket: Option<PathBuf>,
    /// Where a browser reaches the daemon: `url`, or the first TCP listener when the command
    /// talks through the socket.
    pub web: String,
}

impl Target {
    /// The Unix socket when `socket` is given, or when neither `url` nor a token file is and
    /// the configured socket exists (a local administrator needs no token there); otherwise the
    /// daemon's first TCP listener (or `url`) with the token from `token_file`,
    /// `CARDBRIDGE_TOKEN`, or the daemon's generated `api-token`.
    pub fn resolve(
        config: &Config,
        url: Option<String>,
        token_file: Option<PathBuf>,
        socket: Option<PathBuf>,
    ) -> Result<Target, ClientError> {
        let configured_socket = config
            .api
            .unix_socket
            .clone()
            .filter(|p| url.is_none() && token_file.is_none() && p.exists());
        let listener = {
            let addr = config
                .api
                .listen
                .first()
                .copied()
                .unwrap_or_else(|| ([127, 0, 0, 1], 8687).into());
            format!("http://{addr}")
        };
        if let Some(socket) = socket.or(configured_socket) {
            return Ok(Target {
                // The host is not resolved over a socket; the daemon does not check it there.
                url: "http://localhost".into(),
                token: None,
                socket: Some(socket),
                web: listener,
            });
        }
        let url = url.unwrap_or(listener);
        let generated = config.state_dir().join("api-token");
        let token = match token_file {
            Some(path) => std::fs::read_to_string(&path).ok(),
            None => std::env::var("CARDBRIDGE_TOKEN")
                .ok()
                .or_else(|| std::fs::read_to_string(&generated).ok()),
        }
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or(ClientError::NoToken(generated))?;
        let url = url.trim_end_matches('/').to_string();
        Ok(Target {
            web: url.clone(),
            url,
            token: Some(token),
            socket: None,
        })
    }

    /// Where requests go, for messages.
    fn place(&self) -> String {
        match &self.socket {
            Some(path) => path.display().to_string(),
            None => self.url.clone(),
        }
    }

    fn client(&self) -> Result<reqwest::Client, ClientError> {
        let builder = reqwest::Client::builder();
        let builder = match &self.socket {
            Some(path) => builder.unix_socket(path.as_path()),
            None => builder,
        };
        builder.build().map_err(|e| ClientError::Unreachable {
            url: self.place(),
            reason: e.to_string(),
        })
    }

    fn get(&self, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        self.with_token(client.get(format!("{}{path}", self.url)))
    }

    fn post(&self, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        self.with_token(client.post(format!("{}{path}", self.url)))
    }

    fn with_token(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)
}

async fn send(
    target: &Target,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, ClientError> {
    let response = request.send().await.map_err(|e| ClientError::Unreachable {
        url: target.place(),
        reason: e.to_string(),
    })?;
    if !response.status().is_success() {
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        return Err(ClientError::Refused { status, body });
    }
    Ok(response)
}

/// [`send`], and the answer's JSON body.
async fn send_json<T: serde::de::DeserializeOwned>(
    target: &Target,
    request: reqwest::RequestBuilder,
) -> Result<T, ClientError> {
    send(target, request)
        .await?
        .json()
        .await
        .map_err(|e| ClientError::BadAnswer(e.to_string()))
}

/// `cardbridge cards`: the cards in the station's readers, as the API gives them (JSON), or a
/// short table: reader, kind, card id, then each certificate's slot, thumbprint and subject.
pub fn cards(target: &Target, json: bool, out: &mut dyn Write) -> Result<(), ClientError> {
    let cards: Vec<Value> = runtime()?.block_on(async {
        let client = target.client()?;
        send_json(target, target.get(&client, "/v1/cards")).await
    })?;
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let write = |out: &mut dyn Write| -> std::io::Result<()> {
        if json {
            serde_json::to_writer_pretty(&mut *out, &cards)?;
            return writeln!(out);
        }
        if cards.is_empty() {
            writeln!(out, "(no card in any reader)")?;
        }
        for card in &cards {
            writeln!(
                out,
                "{}: {} {}",
                text(&card["reader"]),
                text(&card["kind"]),
                text(&card["card_id"])
            )?;
            if card["error"].is_object() {
                writeln!(out, "  error: {}", text(&card["error"]["message"]))?;
            }
            for c in card["certificates"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "  {:<8} {}  {}",
                    text(&c["slot"]),
                    text(&c["thumbprint"]),
                    text(&c["subject"])
                )?;
            }
        }
        Ok(())
    };
    write(out).map_err(ClientError::Output)
}

/// `cardbridge events`: prints the station's events as they come, one line each
/// (`id name data`), until the daemon stops or the command is interrupted.
pub fn events(target: &Target, out: &mut dyn Write) -> Result<(), ClientError> {
    runtime()?.block_on(async {
        let client = target.client()?;
        let mut response = send(target, target.get(&client, "/v1/events")).await?;
        let mut pending = String::new();
        let (mut id, mut name, mut data) = (String::new(), String::new(), String::new());
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?
        {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                let line = line.trim_end();
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                } else if line.is_empty() && !name.is_empty() {
                    writeln!(out, "{id} {name} {data}").map_err(ClientError::Output)?;
                    out.flush().map_err(ClientError::Output)?;
                    name.clear();
                    data.clear();
                }
            }
        }
        Ok(())
    })
}

/// `cardbridge console`: a one-time sign-in link to the helpdesk console with the caller's
/// scopes. It is printed, and opened in a browser when the session has a display (as Jupyter
/// does); the link is good once, for two minutes.
pub fn console(target: &Target, open: bool, out: &mut dyn Write) -> Result<(), ClientError> {
    let answer: Value = runtime()?.block_on(async {
        let client = target.client()?;
        let request = target
            .post(&client, "/v1/console/sign-in")
            .json(&serde_json::json!({}));
        send_json(target, request).await
    })?;
    let path = answer["path"]
        .as_str()
        .ok_or_else(|| ClientError::BadAnswer("no sign-in path in the answer".into()))?;
    let link = format!("{}{path}", target.web);
    writeln!(
        out,
        "Open the helpdesk console (the link works once, within two minutes):\n\n    {link}\n"
    )
    .map_err(ClientError::Output)?;
    let display = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|d| !d.is_empty()));
    if open && display {
        // A browser that cannot start leaves the printed link, which is enough.
        let _ = std::process::Command::new("xdg-open")
            .arg(&link)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    Ok(())
}

/// `cardbridge revoke`: submits a revocation through the daemon (which stores it before it
/// answers) and prints the stored revocation, or the plan for a dry run, as JSON. Without an
/// explicit key, a random Idempotency-Key is made, so each run is a new revocation.
pub fn revoke(
    target: &Target,
    submission: &crate::revoke::Submission,
    idempotency_key: Option<String>,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let key = match idempotency_key {
        Some(key) => key,
        None => crate::random::random_hex::<16>()
            .map_err(|e| ClientError::BadAnswer(format!("no random source: {e}")))?,
    };
    let answer: Value = runtime()?.block_on(async {
        let client = target.client()?;
        let request = target
            .post(&client, "/v1/revocations")
            .header("idempotency-key", key)
            .json(submission);
        send_json(target, request).await
    })?;
    serde_json::to_writer_pretty(&mut *out, &answer).map_err(|e| ClientError::Output(e.into()))?;
    writeln!(out).map_err(ClientError::Output)
}

/// `cardbridge revocations`: the audit trail of revocations: each with its status and actions
/// (server, target, status, attempts, last answer), newest first; `--json` prints them with
/// every delivery attempt.
pub fn revocations(
    target: &Target,
    json: bool,
    status: Option<&str>,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let list = runtime()?.block_on(fetch_revocations(target, json, status))?;
    let written = if json {
        serde_json::to_writer_pretty(&mut *out, &list)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        render_revocations(&list, out)
    };
    written.map_err(ClientError::Output)
}

/// The list; with `full`, each revocation fetched again with its attempts.
async fn fetch_revocations(
    target: &Target,
    full: bool,
    status: Option<&str>,
) -> Result<Vec<Value>, ClientError> {
    let client = target.client()?;
    let mut request = target.get(&client, "/v1/revocations");
    if let Some(status) = status {
        request = request.query(&[("status", status)]);
    }
    let list: Vec<Value> = send_json(target, request).await?;
    if !full {
        return Ok(list);
    }
    let mut detailed = Vec::with_capacity(list.len());
    for r in &list {
        let id = r["id"].as_i64().unwrap_or_default();
        let one = target.get(&client, &format!("/v1/revocations/{id}"));
        detailed.push(send_json(target, one).await?);
    }
    Ok(detailed)
}

/// One line per revocation, one per action under it.
fn render_revocations(list: &[Value], out: &mut dyn Write) -> std::io::Result<()> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    if list.is_empty() {
        writeln!(out, "(no revocations)")?;
    }
    for r in list {
        writeln!(
            out,
            "#{} {} {} card {} {} by {} ({}) at {}",
            text(&r["id"]),
            text(&r["status"]),
            text(&r["target"]),
            text(&r["card_id"]),
            text(&r["reason"]),
            text(&r["client"]),
            text(&r["revoker"]),
            text(&r["created_at"])
        )?;
        for a in r["actions"].as_array().into_iter().flatten() {
            let what = match a["kind"].as_str() {
                Some("cm_request") => format!(
                    "CM {} request for {}",
                    text(&a["request_type"]),
                    text(&a["smartcard_uuid"])
                ),
                _ => format!("SCEPman revoke {}", text(&a["serial_number"])),
            };
            writeln!(
                out,
                "  {what}: {} after {} attempt(s); last answer: {}",
                text(&a["status"]),
                text(&a["attempts"]),
                text(&a["last_outcome"]["message"])
            )?;
        }
    }
    Ok(())
}
