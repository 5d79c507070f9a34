//! What every request passes before a route sees it, in this order:
//!
//! 1. **Host.** The `Host` header must be an IP address, `localhost`, or a name given with
//!    `--allowed-host`. A page on `attacker.example` whose DNS name is rebound to 127.0.0.1
//!    sends `Host: attacker.example`, so it is refused although it reached the socket.
//! 2. **Origin.** A browser's request from a page of another site (an `Origin` that is not
//!    this server's own) is refused unless `--cors-origin` lists it; listed origins get CORS
//!    headers and their preflights an answer. Without the flag no CORS header is ever sent.
//! 3. **Key.** With `--api-key`, every route but `/health` and the page at `/` needs
//!    `Authorization: Bearer KEY` (the scheme in any case, as HTTP's schemes are).
//! 4. **Body.** A POST body must be `application/json` (browsers send `text/plain` and form
//!    bodies cross-site without a preflight); a `Content-Length` past the limit is refused
//!    before a byte is read; the body must arrive within `--body-timeout`.

use crate::error::ApiError;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

pub(crate) async fn guard(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    match check(&state, req).await {
        Ok(Checked::Pass(req, cors)) => {
            let mut response = next.run(*req).await;
            if let Some(origin) = cors {
                allow(response.headers_mut(), origin);
            }
            response
        }
        Ok(Checked::Preflight(origin)) => {
            let mut response = StatusCode::NO_CONTENT.into_response();
            let h = response.headers_mut();
            allow(h, origin);
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type"),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
            response
        }
        Err(e) => e.into_response(),
    }
}

enum Checked {
    /// Go on to the route; with an allowed cross-site origin, answer with CORS headers for it.
    Pass(Box<Request>, Option<HeaderValue>),
    /// A CORS preflight from an allowed origin.
    Preflight(HeaderValue),
}

fn allow(h: &mut HeaderMap, origin: HeaderValue) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
}

async fn check(state: &AppState, req: Request) -> Result<Checked, ApiError> {
    let cfg = &state.cfg;
    let host = req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or("(not text)"));
    if let Some(host) = host {
        if !host_allowed(host, &cfg.allowed_hosts) {
            return Err(ApiError::forbidden(
                "host_not_allowed",
                format!(
                    "the Host header `{host}` is neither an IP address, localhost, nor a name given with --allowed-host; hint: if that name is this machine's, start whet serve with --allowed-host {}",
                    host_name(host)
                ),
            ));
        }
    }
    let mut cors = None;
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let text = origin.to_str().unwrap_or("(not text)");
        let same_site = host.is_some_and(|h| same_origin(text, h));
        if !same_site {
            if !origin_allowed(text, &cfg.cors_origins) {
                return Err(ApiError::forbidden(
                    "origin_not_allowed",
                    format!(
                        "a request from a web page at `{text}` is refused; hint: start whet serve with --cors-origin {text} if that page may use this server"
                    ),
                ));
            }
            cors = Some(origin.clone());
        }
    }
    if req.method() == Method::OPTIONS {
        let preflight = req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if let (Some(origin), true) = (cors, preflight) {
            return Ok(Checked::Preflight(origin));
        }
        return Err(ApiError::method_not_allowed("OPTIONS", req.uri().path()));
    }
    let open = matches!(req.uri().path(), "/health" | "/");
    if let (Some(key), false) = (&cfg.api_key, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if !given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
            return Err(ApiError::unauthorized());
        }
    }
    if req.method() != Method::POST {
        return Ok(Checked::Pass(Box::new(req), cors));
    }
    let kind = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let media = kind.and_then(|k| k.split(';').next()).map(str::trim);
    if !media.is_some_and(|m| m.eq_ignore_ascii_case("application/json")) {
        return Err(ApiError::not_json(kind.unwrap_or("none")));
    }
    let limit = cfg.max_body_bytes;
    let length = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
    if length.and_then(|l| l.parse::<u64>().ok()).is_some_and(|l| l > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    // The whole body now, against the clock: a client that sends a header and then a byte a
    // minute would otherwise hold its connection and its slot for as long as it likes.
    let (parts, body) = req.into_parts();
    let timeout = cfg.net.body_timeout;
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => return Err(ApiError::body_timeout(timeout.as_secs_f64())),
        Ok(Err(e)) if is_too_large(&e) => return Err(ApiError::too_large(limit)),
        Ok(Err(e)) => return Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
        Ok(Ok(b)) => b,
    };
    Ok(Checked::Pass(Box::new(Request::from_parts(parts, Body::from(bytes))), cors))
}

fn is_too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The host part of a `Host` value: `[::1]:8080` -> `::1`, `example.com:80` -> `example.com`.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = host_name(host);
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(name))
}

/// Whether `origin` (`http://127.0.0.1:8080`) is the server's own site, the one whose `Host`
/// the request carries: the playground page at `/` calls the API from there.
fn same_origin(origin: &str, host: &str) -> bool {
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.trim_end_matches('/').eq_ignore_ascii_case(host))
}

fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    let origin = origin.trim_end_matches('/');
    allowed.iter().any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// Comparison whose time does not depend on where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_cannot_be_a_rebound_name_pass_and_others_need_listing() {
        let none: Vec<String> = vec![];
        for ok in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "localhost:1",
            "LOCALHOST",
            "10.0.0.7",
            "a.localhost:9",
        ] {
            assert!(host_allowed(ok, &none), "{ok}");
        }
        for bad in
            ["attacker.example", "attacker.example:8080", "127.0.0.1.nip.io:80", "localhost.evil"]
        {
            assert!(!host_allowed(bad, &none), "{bad}");
        }
        let listed = vec!["box.lan".to_string()];
        assert!(host_allowed("BOX.lan:8080", &listed));
        assert!(!host_allowed("other.lan:8080", &listed));
        assert!(host_allowed("anything", &["*".to_string()]));
    }

    #[test]
    fn the_servers_own_page_is_same_origin_and_others_are_not() {
        assert!(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:8080"));
        assert!(!same_origin("null", "127.0.0.1:8080"));
        let listed = vec!["https://app.example".to_string()];
        assert!(origin_allowed("https://app.example", &listed));
        assert!(!origin_allowed("https://app.example.evil", &listed));
    }
}
