//! The Azure error envelope: `{"error":{"code","message","target"}}` plus
//! the `x-ms-error-code` header, with a status that matches the code.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub target: Option<String>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            target: None,
            retry_after_s: None,
        }
    }

    pub fn with_target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// 400 `SessionRequestValidationFailed`: the request itself is wrong.
    pub fn validation(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "SessionRequestValidationFailed",
            message,
        )
    }

    pub fn not_supported(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "SessionRequestNotSupported",
            message,
        )
    }

    pub fn pool_not_found(pool: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "SessionPoolNotFound",
            format!("session pool {pool:?} does not exist; list pools with GET /management/pools"),
        )
        .with_target(pool.to_string())
    }

    pub fn session_not_found(identifier: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "SessionWithIdentifierNotFound",
            format!("no session with identifier {identifier:?} exists in this pool"),
        )
        .with_target("identifier")
    }

    pub fn unauthorized(message: &str) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    pub fn payload_too_large(limit: u64) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!(
                "the upload is larger than the {} MiB limit per file",
                limit >> 20
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message)
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "target": self.target,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        let headers = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.code) {
            headers.insert("x-ms-error-code", v);
        }
        if let Some(s) = self.retry_after_s {
            headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn envelope_has_code_message_target_and_header() {
        let e = ApiError::validation("identifier is too short").with_target("identifier");
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            resp.headers()["x-ms-error-code"],
            "SessionRequestValidationFailed"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "SessionRequestValidationFailed");
        assert_eq!(v["error"]["message"], "identifier is too short");
        assert_eq!(v["error"]["target"], "identifier");
    }

    #[tokio::test]
    async fn pool_full_carries_retry_after() {
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "SessionPoolFull", "full");
        e.retry_after_s = Some(3);
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()["retry-after"], "3");
    }
}
