//! Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with the
//! HTTP status that says who is at fault.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) code: &'static str,
    pub(crate) param: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self { status, message, code, param: None }
    }

    /// 400: the body is not what any endpoint takes (not JSON, a bad path).
    pub(crate) fn bad_request(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 422: well-formed JSON with a field whet cannot honour; `param` names it.
    pub(crate) fn unprocessable(message: String, param: Option<&str>) -> Self {
        Self {
            param: param.map(str::to_string),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message)
        }
    }

    pub(crate) fn not_found(code: &'static str, message: String) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or wrong API key: send `Authorization: Bearer KEY`".into(),
        )
    }

    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    /// 415: a body that is not `application/json`. Browsers send `text/plain` and form
    /// bodies from any page without asking the server first (no CORS preflight), so only JSON
    /// is taken: a page on another site cannot drive a server that has no `--api-key`.
    pub(crate) fn not_json(given: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("the body must be `Content-Type: application/json`, not `{given}`"),
        )
    }

    /// 403: a request from where the server does not take them (a `Host` or an `Origin` it
    /// was not told to allow); `code` says which.
    pub(crate) fn forbidden(code: &'static str, message: String) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 405, naming the methods the route takes.
    pub(crate) fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("`{method} {path}` is not a route of this server; see GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/adapters, DELETE /v1/adapters/NAME"),
        )
    }

    /// 408: the body did not arrive in time.
    pub(crate) fn body_timeout(secs: f64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {secs} s of its header"),
        )
    }

    /// 504: work the server waited on did not finish in time.
    pub(crate) fn timed_out(message: String) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
    }

    pub(crate) fn busy(limit: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!(
                "the server is already handling {limit} requests (--max-concurrent); retry later"
            ),
        )
    }

    pub(crate) fn unavailable(message: String) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub(crate) fn internal(message: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// OpenAI's `type`: who is at fault.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
