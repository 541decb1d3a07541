//! What the gateway answers when it does not answer with a result: one error, written as
//! the protocol of the route asked for it. OpenAI routes get OpenAI's envelope
//! (`{"error": {"message", "type", "param", "code"}}`), KServe routes the Open Inference
//! Protocol's (`{"error": "<message>"}`); the status and `Retry-After` are the same for both.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sundara_schemas::{FailureCode, RejectCode};

/// Which protocol's error body a route writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    OpenAi,
    KServe,
}

/// A refusal or failure, with what each protocol needs of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `rate_limit_error`, ...
    pub kind: &'static str,
    /// A stable code clients can branch on (Sundara's reject and failure codes).
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// Seconds to wait before retrying (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, code, message: message.into(), param: None, retry_after: None }
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "no valid API key: send `Authorization: Bearer <key>`",
        )
    }

    pub fn unknown_model(model: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "model_not_found", format!("no model {model:?}"))
            .with_param("model")
    }

    /// The gateway's own bound on requests in flight is reached.
    pub fn busy() -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "busy", "the gateway is at its request limit")
            .retry_after(1)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal", message)
    }

    /// What a rejected submission becomes.
    pub fn rejected(code: RejectCode, reason: String) -> ApiError {
        use RejectCode::*;
        let (status, kind) = match code {
            UnknownModel => (StatusCode::NOT_FOUND, "invalid_request_error"),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error"),
            ModelTooLarge => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            Overloaded | RateLimited | TooManyInFlight | StorageQuota => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error")
            }
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            Malformed | UnsupportedVersion | InvalidName | MissingInput | UnexpectedInput | WrongDtype | WrongShape
            | HostileShape | PriorityNotPermitted | TimeoutTooShort => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
        };
        let error = ApiError::new(status, kind, code.as_str(), reason);
        match status {
            StatusCode::TOO_MANY_REQUESTS => error.retry_after(1),
            StatusCode::SERVICE_UNAVAILABLE => error.retry_after(5),
            _ => error,
        }
    }

    /// What a task that ended without a verified result becomes.
    pub fn failed(code: FailureCode, reason: String) -> ApiError {
        match code {
            FailureCode::Expired => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", "expired", reason),
            FailureCode::NoConsensus => ApiError::new(StatusCode::BAD_GATEWAY, "server_error", "no_consensus", reason),
        }
    }

    pub fn render(self, protocol: Protocol) -> Response {
        let body = match protocol {
            Protocol::OpenAi => json!({"error": {
                "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
            }}),
            Protocol::KServe => json!({"error": self.message, "code": self.code}),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reject_code_has_its_status() {
        let status = |code| ApiError::rejected(code, String::new()).status;
        assert_eq!(status(RejectCode::WrongShape), StatusCode::BAD_REQUEST);
        assert_eq!(status(RejectCode::UnknownModel), StatusCode::NOT_FOUND);
        assert_eq!(status(RejectCode::PayloadTooLarge), StatusCode::PAYLOAD_TOO_LARGE);
        let limited = ApiError::rejected(RejectCode::RateLimited, "slow down".into());
        assert_eq!(
            (limited.status, limited.retry_after, limited.code),
            (StatusCode::TOO_MANY_REQUESTS, Some(1), "rate_limited")
        );
        assert_eq!(status(RejectCode::Overloaded), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(status(RejectCode::ModelTooLarge), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ApiError::failed(FailureCode::Expired, String::new()).status, StatusCode::GATEWAY_TIMEOUT);
    }
}
