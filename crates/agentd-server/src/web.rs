//! The web chat page (SPEC.md section 3: `GET /` and its assets, no auth). The four files under `web/static/`
//! are compiled into the binary, so the page works offline and a deployment is one file. The page asks for an
//! API key itself when `/v1` answers 401.
//!
//! The Content-Security-Policy only allows this origin (and data: images, which is how attached images are
//! shown), so the page cannot load anything from the network even by mistake.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AppState;

const INDEX_HTML: &str = include_str!("../../../web/static/index.html");
const APP_JS: &str = include_str!("../../../web/static/app.js");
/// The error codes and event types the page and the server share (`tests/codes.rs` holds both to it).
const CODES_JS: &str = include_str!("../../../web/static/codes.js");
const APP_CSS: &str = include_str!("../../../web/static/app.css");

const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
     connect-src 'self' ws: wss:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    assets()
}

/// The page's routes; they need no state, so tests can serve them alone.
fn assets<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/codes.js",
            get(|| async { asset("text/javascript; charset=utf-8", CODES_JS) }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The files change with the binary; revalidating costs little at this size.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failed assertion

    use super::*;

    async fn serve() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, assets::<()>()).await });
        url
    }

    #[tokio::test]
    async fn page_and_assets_are_served_with_their_types() {
        let url = serve().await;
        let http = reqwest::Client::new();
        for (path, ty, marker) in [
            ("/", "text/html", "/assets/app.js"),
            ("/assets/app.js", "text/javascript", "new WebSocket("),
            ("/assets/codes.js", "text/javascript", "AGENTD_CODES"),
            ("/assets/app.css", "text/css", "#transcript"),
        ] {
            let resp = http.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            let headers = resp.headers().clone();
            let got = headers[header::CONTENT_TYPE].to_str().unwrap();
            assert!(got.starts_with(ty), "{path}: content type {got}");
            assert!(headers[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("default-src 'none'"));
            let body = resp.text().await.unwrap();
            assert!(body.contains(marker), "{path} lacks {marker}");
        }
        let missing = http
            .get(format!("{url}/assets/nope.js"))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("codes.js", CODES_JS),
            ("app.css", APP_CSS),
        ] {
            for scheme in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(scheme), "{name} mentions {scheme}");
            }
        }
    }
}
