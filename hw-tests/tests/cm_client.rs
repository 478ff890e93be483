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
    let config =
        Config::parse(&format!("[cm]\nbase_url = \"{}\"\n", sim.cm_base_url())).expect("config");
    CmClient::new(config.cm.as_ref().expect("cm section")).expect("client")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
