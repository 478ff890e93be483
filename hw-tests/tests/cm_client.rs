//! The CM client against the simulator, without a card: quirks of the real server's answers.

use cardbridge::cm::{CmClient, NewRequest};
use cardbridge::config::Config;
use hw_tests::sim::{Fixture, SimCard, Simulator};
use serde_json::json;

fn fixture() -> Fixture {
    Fixture {
        smartcards: vec![SimCard {
            smartcard: json!({"Uuid": "438d1b30-f3b4-4bed-85fa-285e08605ba7", "Status": 2,
                              "SerialNumber": "{d1ef6869-5517-42a0-8f05-16ca1a0b834d}", "Atr": "3b8d"}),
            certificates: (0..4)
                .map(|n| json!({"IsKeyHistory": n == 3, "ArchivedOnCa": false, "CertificateType": 1,
                               "TemplateCommonName": "ContosoSmartcardUser", "SerialNumber": "1B0000B01052AFA01313FB77AC00010000B010",
                               "Thumbprint": format!("{n:040X}")}))
                .collect(),
            operations: vec!["Retire".into()],
        }],
        ..Fixture::default()
    }
}

fn client(sim: &Simulator) -> CmClient {
    client_with(sim, "")
}

fn client_with(sim: &Simulator, extra: &str) -> CmClient {
    let text = format!(
        "[cm]\nbase_url = \"{}\"\nretries = 0\n{extra}",
        sim.cm_base_url()
    );
    let config = Config::parse(&text).expect("config");
    CmClient::new(config.cm.as_ref().expect("cm section")).expect("client")
}

fn runtime() -> tokio::runtime::Runtime {
    // The same kind of runtime as `scan --reconcile` and the engine's reconciliation thread.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn reads_single_objects_arrays_and_204_and_reuses_one_connection() {
    let sim = Simulator::start(fixture(), 0).expect("simulator");
    let cm = client(&sim);
    runtime().block_on(async {
        let found = cm
            .find_smartcards("D1EF6869-5517-42A0-8F05-16CA1A0B834D")
            .await
            .expect("find");
        assert_eq!(found.len(), 1, "a single object is a list of one");
        assert!(cm
            .find_smartcards("00000000-0000-0000-0000-000000000000")
            .await
            .expect("204")
            .is_empty());
        let uuid = "438d1b30-f3b4-4bed-85fa-285e08605ba7";
        assert_eq!(cm.certificates(uuid).await.expect("certificates").len(), 4);
        assert_eq!(cm.operations(uuid).await.expect("operations"), ["retire"]);
        assert!(cm.smartcard(uuid).await.expect("smartcard").is_some());
    });
    let ports: std::collections::BTreeSet<u16> =
        sim.log().iter().map(|l| l.client.port()).collect();
    assert_eq!(ports.len(), 1, "{:#?}", sim.log());
}

#[test]
fn creates_a_request_and_reads_it_back() {
    let sim = Simulator::start(fixture(), 0).expect("simulator");
    let cm = client(&sim);
    runtime().block_on(async {
        let uri = cm
            .create_request(&NewRequest {
                request_type: "Retire".into(),
                smartcard: "438d1b30-f3b4-4bed-85fa-285e08605ba7".into(),
                comment: "lost card".into(),
                datacollection: Vec::new(),
            })
            .await
            .expect("create");
        let id = uri
            .strip_prefix("api/v1.0/requests/")
            .expect("bare relative URI");
        let request = cm.request(id).await.expect("get").expect("exists");
        assert_eq!(
            cardbridge::cm::model::request_status_name(request.status),
            "Pending"
        );
    });
    let posts: Vec<_> = sim
        .log()
        .into_iter()
        .filter(|l| l.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1);
    assert!(
        posts[0].body.contains("\"type\":\"Retire\""),
        "{}",
        posts[0].body
    );
}

/// An internal CA, and a certificate for `name` signed by it, with the keys.
fn pki(
    name: &str,
) -> (
    rcgen::Certificate,
    rcgen::KeyPair,
    rcgen::Certificate,
    rcgen::KeyPair,
) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Contoso Internal Root");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("certificate");
    (ca, ca_key, cert, key)
}

#[test]
fn https_with_the_organisations_ca_bundle() {
    let (ca, _, server, server_key) = pki("127.0.0.1");
    let chain = vec![server.der().to_vec(), ca.der().to_vec()];
    let sim = Simulator::start_tls(fixture(), 0, chain, server_key.serialize_der(), None)
        .expect("simulator");
    assert!(sim.cm_base_url().starts_with("https://"));

    // Without the bundle the server's certificate is not trusted: a TLS error, not a hang.
    let err = runtime()
        .block_on(client(&sim).find_smartcards("d1ef6869-5517-42a0-8f05-16ca1a0b834d"))
        .expect_err("untrusted certificate");
    assert_eq!(err.code(), "tls", "{err}");

    let dir = std::env::temp_dir().join(format!("cardbridge-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bundle = dir.join("ca.pem");
    std::fs::write(&bundle, ca.pem()).expect("write bundle");
    let trusted = client_with(&sim, &format!("ca_bundle = \"{}\"\n", bundle.display()));
    let found = runtime()
        .block_on(trusted.find_smartcards("d1ef6869-5517-42a0-8f05-16ca1a0b834d"))
        .expect("trusted through the bundle");
    assert_eq!(found.len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plain_http_is_refused_by_an_https_client_with_a_clear_error() {
    let sim = Simulator::start(fixture(), 0).expect("simulator");
    let config = Config::parse(&format!(
        "[cm]\nbase_url = \"https://{}/CertificateManagement/\"\nretries = 0\n",
        sim.addr
    ))
    .expect("config");
    let cm = CmClient::new(config.cm.as_ref().expect("cm")).expect("client");
    let err = runtime()
        .block_on(cm.find_smartcards("x"))
        .expect_err("not TLS");
    assert_eq!(err.code(), "tls", "{err}");
}

#[test]
fn mutual_tls_with_a_client_certificate() {
    let (ca, ca_key, server, server_key) = pki("127.0.0.1");
    let station_key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kiosk-07");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let station = params
        .signed_by(&station_key, &ca, &ca_key)
        .expect("client certificate");
    let chain = vec![server.der().to_vec()];
    let sim = Simulator::start_tls(
        fixture(),
        0,
        chain,
        server_key.serialize_der(),
        Some(ca.der().to_vec()),
    )
    .expect("simulator");

    let dir = std::env::temp_dir().join(format!("cardbridge-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bundle = dir.join("ca.pem");
    std::fs::write(&bundle, ca.pem()).expect("write bundle");
    let identity = dir.join("station.pem");
    std::fs::write(
        &identity,
        format!("{}{}", station.pem(), station_key.serialize_pem()),
    )
    .expect("write identity");

    let anonymous = client_with(&sim, &format!("ca_bundle = \"{}\"\n", bundle.display()));
    let err = runtime()
        .block_on(anonymous.find_smartcards("d1ef6869-5517-42a0-8f05-16ca1a0b834d"))
        .expect_err("a client certificate is required");
    assert!(matches!(err.code(), "tls" | "connect"), "{err}");

    let extra = format!(
        "ca_bundle = \"{}\"\nclient_certificate = \"{}\"\n",
        bundle.display(),
        identity.display()
    );
    let found = runtime()
        .block_on(client_with(&sim, &extra).find_smartcards("d1ef6869-5517-42a0-8f05-16ca1a0b834d"))
        .expect("accepted with the client certificate");
    assert_eq!(found.len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bearer_and_basic_authentication_and_case_insensitive_routes() {
    let sim = Simulator::start(fixture(), 0).expect("simulator");
    let dir = std::env::temp_dir().join(format!("cardbridge-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("token"), "s3cret-token\n").expect("token");
    std::fs::write(dir.join("password"), "pa55").expect("password");
    for secret in ["token", "password"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(secret), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    // The documentation's examples use both cases of the base path; the server takes either.
    let lower = format!("http://{}/certificatemanagement/", sim.addr);
    for (auth, expected) in [
        (
            format!(
                "auth = \"bearer\"\ntoken_file = \"{}\"\n",
                dir.join("token").display()
            ),
            "Bearer s3cret-token",
        ),
        (
            format!(
                "auth = \"basic\"\nusername = \"svc\"\npassword_file = \"{}\"\n",
                dir.join("password").display()
            ),
            "Basic c3ZjOnBhNTU=",
        ),
    ] {
        sim.clear_log();
        let config =
            Config::parse(&format!("[cm]\nbase_url = \"{lower}\"\n{auth}")).expect("config");
        let cm = CmClient::new(config.cm.as_ref().expect("cm")).expect("client");
        let found = runtime()
            .block_on(cm.find_smartcards("d1ef6869-5517-42a0-8f05-16ca1a0b834d"))
            .expect("find");
        assert_eq!(found.len(), 1);
        assert_eq!(sim.log()[0].authorization.as_deref(), Some(expected));
        assert!(sim.log()[0].path.starts_with("/certificatemanagement/"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn scepman_search_pages_and_revoke_answers() {
    use hw_tests::sim::ScepmanCert;
    let mut fx = fixture();
    fx.scepman = (0..5)
        .map(|n| ScepmanCert {
            serial_number: format!("480552CEBBE40FD5D4417532033728F35304000{n}"),
            subject: format!("CN=device{n}.contoso.local"),
            ..ScepmanCert::default()
        })
        .collect();
    let sim = Simulator::start(fx, 0).expect("simulator");
    let base = format!("http://{}", sim.addr);
    runtime().block_on(async {
        let http = reqwest::Client::new();
        let page: serde_json::Value = http
            .get(format!(
                "{base}/api/manage/search?SearchText=contoso&PageSize=2"
            ))
            .send()
            .await
            .expect("search")
            .json()
            .await
            .expect("json");
        assert_eq!(page["items"].as_array().map(Vec::len), Some(2));
        let token = page["continuationToken"]
            .as_str()
            .expect("more pages")
            .to_string();
        let last: serde_json::Value = http
            .get(format!(
                "{base}/api/manage/search?searchText=contoso&pageSize=2&continuationToken={token}"
            ))
            .send()
            .await
            .expect("search")
            .json()
            .await
            .expect("json");
        assert_eq!(last["items"].as_array().map(Vec::len), Some(2));

        let revoke = |serial: &str| {
            http.patch(format!("{base}/api/manage/revoke/{serial}"))
                .json(&json!({"revocationReason": 1, "revoker": "helpdesk@contoso.com"}))
                .send()
        };
        let ok = revoke("480552CEBBE40FD5D4417532033728F353040000")
            .await
            .expect("revoke");
        assert_eq!(ok.status(), 200);
        let again = revoke("480552CEBBE40FD5D4417532033728F353040000")
            .await
            .expect("revoke");
        assert_eq!(again.status(), 409);
        let body: serde_json::Value = again.json().await.expect("json");
        assert_eq!(body["errorCode"], 5013);
        let unknown = revoke("00").await.expect("revoke");
        assert_eq!(unknown.status(), 404);
        let body: serde_json::Value = unknown.json().await.expect("json");
        assert_eq!(body["errorCode"], 7012);
    });
}

#[test]
fn an_answer_over_one_mebibyte_is_a_bad_body_not_read_whole() {
    use hw_tests::sim::Fault;
    let sim = Simulator::start(fixture(), 0).expect("simulator");
    sim.set_fault(
        "smartcards",
        Fault {
            huge_body: 2 << 20,
            ..Fault::default()
        },
    );
    let e = runtime()
        .block_on(client(&sim).find_smartcards("d1ef6869-5517-42a0-8f05-16ca1a0b834d"))
        .expect_err("refused");
    assert_eq!(e.code(), "bad_body");
    assert!(e.to_string().contains("larger than 1024 KiB"), "{e}");
}
