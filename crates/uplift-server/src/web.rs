//! The operator's web console: a page at `/` and its scripts and styles
//! under `/assets/`, built into the binary from `web/` (so `cargo build`
//! builds the whole product and the page works on an offline network).
//!
//! The page holds no secret and no data: it is a client of the public REST
//! API, calling it with the operator's token as the CLI does. So serving it
//! needs no authentication; what it shows and does is decided by the API.
//! Every answer carries a strict Content-Security-Policy: scripts and
//! styles only from this server, none inline, no framing.

use crate::budget;
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rust_embed::RustEmbed;
use std::sync::Arc;

/// The console's files: `web/` in this crate.
#[derive(RustEmbed)]
#[folder = "web/"]
struct Assets;

pub const PAGE_PATH: &str = "/";
pub const ASSETS_PREFIX: &str = "/assets/";

/// `connect-src 'self'` lets the page call the API and open the event
/// stream on this origin only; `form-action 'none'` because forms submit
/// through the API, never as a navigation.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page and its assets, under the admin request budget.
pub fn routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route(PAGE_PATH, get(page))
        .route("/assets/{*path}", get(asset))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            budget::limit_admin,
        ))
}

async fn page(State(_): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn asset(
    State(_): State<Arc<AppState>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    serve(&path, &headers)
}

/// Answers with one embedded file, or 304 when the browser's copy (by
/// ETag) is current. Files are revalidated on every use (`no-cache`), so a
/// new server version's page is picked up on the next reload.
fn serve(path: &str, request: &HeaderMap) -> Response {
    // Names come from the URL: nothing outside web/ is ever looked up.
    let plain = path
        .split('/')
        .all(|p| !p.is_empty() && p != "." && p != "..");
    let Some(file) = Assets::get(path).filter(|_| plain && !path.contains('\\')) else {
        return ApiError::not_found(format!(
            "no web console file {path:?}; the console starts at /"
        ))
        .into_response();
    };
    let etag = format!("\"{}\"", hex::encode(file.metadata.sha256_hash()));
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                content_type(path, file.metadata.mimetype()),
            )],
            file.data,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(headers);
    response
}

/// JavaScript modules must be served as JavaScript; text gets a charset.
fn content_type(path: &str, guessed: &str) -> HeaderValue {
    let value = match path.rsplit('.').next() {
        Some("js") => "text/javascript; charset=utf-8",
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("txt") => "text/plain; charset=utf-8",
        _ => guessed,
    };
    HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

/// Headers that keep the page from being framed, sniffed or leaking the
/// URL it came from.
fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_every_script_it_loads_are_built_in() {
        let page = Assets::get("index.html").expect("web/index.html");
        let page = String::from_utf8(page.data.into_owned()).unwrap();
        let mut scripts = 0;
        for src in page.split("src=\"").skip(1) {
            let src = &src[..src.find('"').unwrap()];
            let path = src.strip_prefix(ASSETS_PREFIX).expect("a local asset");
            assert!(Assets::get(path).is_some(), "{src} is not built in");
            scripts += 1;
        }
        assert!(scripts > 0, "the page loads no script");
        assert!(!page.contains("<script>"), "inline scripts break the CSP");
    }

    #[test]
    fn scripts_import_only_built_in_modules() {
        // A bare or remote import would fail in the browser (no import map,
        // no CDN): every relative import must name an embedded file.
        for path in Assets::iter().filter(|p| p.ends_with(".js")) {
            let text = String::from_utf8(Assets::get(&path).unwrap().data.into_owned()).unwrap();
            let dir = path.rsplit_once('/').map_or("", |(dir, _)| dir);
            for quote in ['"', '\''] {
                for from in text
                    .split(&format!("from{quote}"))
                    .skip(1)
                    .chain(text.split(&format!("from {quote}")).skip(1))
                {
                    let target = &from[..from.find(quote).unwrap()];
                    assert!(
                        target.starts_with("./") || target.starts_with("../"),
                        "{path} imports {target:?}, which the browser cannot resolve"
                    );
                    let resolved = resolve(dir, target);
                    assert!(
                        Assets::get(&resolved).is_some(),
                        "{path} imports {target} ({resolved}), which is not built in"
                    );
                }
            }
        }
    }

    fn resolve(dir: &str, target: &str) -> String {
        let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
        for part in target.split('/') {
            match part {
                "." => {}
                ".." => {
                    parts.pop();
                }
                part => parts.push(part),
            }
        }
        parts.join("/")
    }

    #[test]
    fn answers_carry_the_security_headers_and_a_304_for_a_current_copy() {
        let first = serve("index.html", &HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        let headers = first.headers();
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, headers[header::ETAG].clone());
        assert_eq!(
            serve("index.html", &again).status(),
            StatusCode::NOT_MODIFIED
        );
        for missing in [
            "no/such.js",
            "../Cargo.toml",
            "vendor/../index.html",
            "/etc/passwd",
        ] {
            assert_eq!(
                serve(missing, &HeaderMap::new()).status(),
                StatusCode::NOT_FOUND,
                "{missing}"
            );
        }
    }
}
