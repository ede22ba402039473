//! The web chat page (SPEC.md section 3: `GET /` and its assets, no auth). Every file under `web/static/` that
//! the page loads is compiled into the binary ([`ASSETS`]), so the page works offline and a deployment is one
//! file. The page asks for an API key itself when `/v1` answers 401.
//!
//! The page is ES modules (`app.js` imports `conn.js`, `model.js`, `view.js`, `markdown.js`) plus the shared
//! list `codes.js` and three vendored libraries under `vendor/` (marked, DOMPurify, highlight.js; copied from
//! `web/node_modules` by `npm run vendor`, licences beside them).
//!
//! The Content-Security-Policy only allows this origin (and data: images, which is how attached images are
//! shown), so the page cannot load anything from the network even by mistake.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AppState;

const INDEX_HTML: &str = include_str!("../../../web/static/index.html");

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// The page's assets under `/assets/`: (path, content type, body).
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", JS, include_str!("../../../web/static/app.js")),
    ("conn.js", JS, include_str!("../../../web/static/conn.js")),
    ("model.js", JS, include_str!("../../../web/static/model.js")),
    ("view.js", JS, include_str!("../../../web/static/view.js")),
    (
        "markdown.js",
        JS,
        include_str!("../../../web/static/markdown.js"),
    ),
    // The error codes and event types the page and the server share (`tests/codes.rs` holds both to it).
    ("codes.js", JS, include_str!("../../../web/static/codes.js")),
    ("app.css", CSS, include_str!("../../../web/static/app.css")),
    (
        "vendor/marked.min.js",
        JS,
        include_str!("../../../web/static/vendor/marked.min.js"),
    ),
    (
        "vendor/purify.min.js",
        JS,
        include_str!("../../../web/static/vendor/purify.min.js"),
    ),
    (
        "vendor/highlight.min.js",
        JS,
        include_str!("../../../web/static/vendor/highlight.min.js"),
    ),
    (
        "vendor/highlight-github.min.css",
        CSS,
        include_str!("../../../web/static/vendor/highlight-github.min.css"),
    ),
    (
        "vendor/marked.LICENSE",
        TEXT,
        include_str!("../../../web/static/vendor/marked.LICENSE"),
    ),
    (
        "vendor/dompurify.LICENSE",
        TEXT,
        include_str!("../../../web/static/vendor/dompurify.LICENSE"),
    ),
    (
        "vendor/highlight.LICENSE",
        TEXT,
        include_str!("../../../web/static/vendor/highlight.LICENSE"),
    ),
];

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
            "/assets/{*path}",
            get(|Path(path): Path<String>| async move {
                match ASSETS.iter().find(|(p, _, _)| *p == path) {
                    Some((_, ty, body)) => asset(ty, body),
                    None => StatusCode::NOT_FOUND.into_response(),
                }
            }),
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
            ("/assets/conn.js", "text/javascript", "export class Cursor"),
            (
                "/assets/model.js",
                "text/javascript",
                "export function applyEvent",
            ),
            (
                "/assets/view.js",
                "text/javascript",
                "export class TranscriptView",
            ),
            ("/assets/markdown.js", "text/javascript", "DOMPurify"),
            ("/assets/codes.js", "text/javascript", "AGENTD_CODES"),
            ("/assets/app.css", "text/css", "#transcript"),
            ("/assets/vendor/marked.min.js", "text/javascript", "marked"),
            (
                "/assets/vendor/purify.min.js",
                "text/javascript",
                "DOMPurify",
            ),
            ("/assets/vendor/highlight.min.js", "text/javascript", "hljs"),
            (
                "/assets/vendor/highlight-github.min.css",
                "text/css",
                ".hljs",
            ),
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
        for path in ["/assets/nope.js", "/assets/vendor/nope.js", "/assets/"] {
            let missing = http.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(missing.status(), 404, "{path}");
        }
    }

    /// Every file under web/static/ is served: a new module or library cannot be forgotten in [`ASSETS`].
    #[test]
    fn every_static_file_is_embedded() {
        fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    let rel = p.strip_prefix(base).unwrap().to_string_lossy().to_string();
                    out.push(rel);
                }
            }
        }
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web/static");
        let mut files = Vec::new();
        walk(&base, &base, &mut files);
        for f in files.iter().filter(|f| *f != "index.html") {
            assert!(
                ASSETS.iter().any(|(p, _, _)| p == f),
                "web/static/{f} is not in web.rs ASSETS"
            );
        }
        assert_eq!(files.len(), ASSETS.len() + 1, "{files:?}");
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        // The page's own files; the vendored libraries name URLs in comments and namespaces (the CSP keeps
        // them from loading anything).
        let own = ASSETS
            .iter()
            .filter(|(p, _, _)| !p.starts_with("vendor/"))
            .map(|(p, _, body)| (*p, *body));
        for (name, text) in std::iter::once(("index.html", INDEX_HTML)).chain(own) {
            for scheme in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(scheme), "{name} mentions {scheme}");
            }
        }
    }
}
