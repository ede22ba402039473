//! Sessions as the web page uses them, through real HTTP against a real SQLite file: rename
//! (`PATCH /v1/sessions/{id}`), search and status filter (`GET /v1/sessions?q=&status=`, paged with
//! `limit`/`before`), and the title a session created without one takes from its first message.

#![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

mod common;

use common::{Client, Options, Server};
use serde_json::{json, Value};

const KEYS: &str = "[[auth.keys]]\nprincipal = \"alice\"\nkey = \"sk-alice\"\n\n[[auth.keys]]\nprincipal = \"bob\"\nkey = \"sk-bob\"\n";

async fn two_principals() -> (Server, Client, Client) {
    let s = Server::start_with(Options {
        extra: KEYS.into(),
        ..Options::default()
    })
    .await;
    let alice = s.client_with_key(Some("sk-alice"));
    let bob = s.client_with_key(Some("sk-bob"));
    (s, alice, bob)
}

async fn titled(c: &Client, title: &str) -> String {
    let (status, v) = c
        .post(
            "/v1/sessions",
            json!({"agent": "assistant", "title": title}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn rename_answers_the_session_and_keeps_the_bounds() {
    let (_s, alice, bob) = two_principals().await;
    let id = alice.session().await;
    let path = format!("/v1/sessions/{id}");

    let (status, v) = alice
        .call("PATCH", &path, Some(json!({"title": "  Trip to Lisbon  "})))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["title"], "Trip to Lisbon", "trimmed");
    assert_eq!(v["agent"], "assistant");
    let (_, got) = alice.get(&path).await;
    assert_eq!(got["title"], "Trip to Lisbon", "stored");

    // SPEC section 9: at most 1,024 bytes (a multi-byte title counts bytes, not chars).
    let exact = "é".repeat(512);
    let (status, v) = alice
        .call("PATCH", &path, Some(json!({"title": exact})))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = alice
        .call("PATCH", &path, Some(json!({"title": format!("{exact}x")})))
        .await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"]["code"], "too_large");
    let (_, got) = alice.get(&path).await;
    assert_eq!(got["title"], exact.as_str(), "nothing stored on 413");

    let (status, v) = alice
        .call("PATCH", &path, Some(json!({"title": "   "})))
        .await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (400, &json!("invalid_request"))
    );
    let (status, _) = alice.call("PATCH", &path, Some(json!({"name": "x"}))).await;
    assert_eq!(status, 400, "unknown field");

    // Another principal's session is a 404, and stays as it was.
    let (status, v) = bob
        .call("PATCH", &path, Some(json!({"title": "mine now"})))
        .await;
    assert_eq!((status, &v["error"]["code"]), (404, &json!("not_found")));
    let (status, _) = alice
        .call("PATCH", "/v1/sessions/nope", Some(json!({"title": "x"})))
        .await;
    assert_eq!(status, 404);
    let (_, got) = alice.get(&path).await;
    assert_eq!(got["title"], exact.as_str());

    // A closed session can still be renamed (its history stays readable).
    alice.call("DELETE", &path, None).await;
    let (status, v) = alice
        .call("PATCH", &path, Some(json!({"title": "archived"})))
        .await;
    assert_eq!((status, v["status"].as_str()), (200, Some("closed")));
}

#[tokio::test]
async fn a_session_without_a_title_is_named_after_its_first_message() {
    let (_s, alice, _bob) = two_principals().await;
    let id = alice.session().await;
    let (_, v) = alice.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(v["title"], Value::Null);
    let (status, _) = alice
        .send(
            &id,
            "  \n  How do I bake sourdough bread?  \nWith details please.",
        )
        .await;
    assert_eq!(status, 200);
    let (_, v) = alice.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(v["title"], "How do I bake sourdough bread?");
    // Later messages do not rename it.
    alice.send(&id, "another question").await;
    let (_, v) = alice.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(v["title"], "How do I bake sourdough bread?");

    // A long first line is cut at 60 characters on a char boundary.
    let long = alice.session().await;
    alice.send(&long, &"ü".repeat(200)).await;
    let (_, v) = alice.get(&format!("/v1/sessions/{long}")).await;
    let title = v["title"].as_str().unwrap();
    assert_eq!(title.chars().count(), 60, "{title}");
    assert!(title.starts_with("üü") && title.ends_with('…'));

    // A title given at creation, or set by a rename before the first message, stays.
    let named = titled(&alice, "agentd chat").await;
    alice.send(&named, "what is 6*7?").await;
    let (_, v) = alice.get(&format!("/v1/sessions/{named}")).await;
    assert_eq!(v["title"], "agentd chat");
    let renamed = alice.session().await;
    alice
        .call(
            "PATCH",
            &format!("/v1/sessions/{renamed}"),
            Some(json!({"title": "picked"})),
        )
        .await;
    alice.send(&renamed, "first message").await;
    let (_, v) = alice.get(&format!("/v1/sessions/{renamed}")).await;
    assert_eq!(v["title"], "picked");
}

#[tokio::test]
async fn sessions_are_searched_and_filtered_by_status_and_paged() {
    let (_s, alice, bob) = two_principals().await;
    let a0 = titled(&alice, "Bread recipes").await;
    let a1 = titled(&alice, "Taxes 2025").await;
    let a2 = titled(&alice, "more BREAD").await;
    let a3 = titled(&alice, "Über bread").await;
    let _b0 = titled(&bob, "bread of bob").await;

    let (status, v) = alice.get("/v1/sessions?q=bread").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        ids(&v),
        [a3.clone(), a2.clone(), a0.clone()],
        "newest first, only alice's"
    );
    let (_, v) = alice.get("/v1/sessions?q=%C3%BCBER").await;
    assert_eq!(ids(&v), vec![a3.clone()], "case-insensitive beyond ASCII");

    // Paged like the plain list.
    let (_, page1) = alice.get("/v1/sessions?q=bread&limit=2").await;
    assert_eq!(ids(&page1), [a3.clone(), a2.clone()]);
    let (_, page2) = alice
        .get(&format!("/v1/sessions?q=bread&limit=2&before={a2}"))
        .await;
    assert_eq!(ids(&page2), vec![a0.clone()]);

    // DELETE closes; the page lists `status=active`, and the closed one is still there to find.
    let (status, _) = alice
        .call("DELETE", &format!("/v1/sessions/{a2}"), None)
        .await;
    assert_eq!(status, 200);
    let (_, v) = alice.get("/v1/sessions?status=active").await;
    assert_eq!(ids(&v), [a3.clone(), a1.clone(), a0.clone()]);
    let (_, v) = alice.get("/v1/sessions?status=closed").await;
    assert_eq!(ids(&v), vec![a2.clone()]);
    let (_, v) = alice.get("/v1/sessions?status=active&q=bread").await;
    assert_eq!(ids(&v), [a3.clone(), a0.clone()]);
    let (_, v) = alice.get("/v1/sessions").await;
    assert_eq!(v.as_array().unwrap().len(), 4, "no filter: everything");
    let (_, v) = alice.get("/v1/sessions?q=").await;
    assert_eq!(
        v.as_array().unwrap().len(),
        4,
        "an empty query filters nothing"
    );

    let (status, v) = alice.get("/v1/sessions?status=deleted").await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (400, &json!("invalid_request"))
    );
    let (_, v) = alice.get("/v1/sessions?q=taxes%20nope").await;
    assert!(v.as_array().unwrap().is_empty());
}
