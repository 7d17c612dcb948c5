//! The one place where errors become SPEC §8's envelope `{error, code, status}`.

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::ServiceResponse;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use switchboard_actors::error::{ApiError, ErrorCode};

/// An `ApiError` on its way out through actix-web.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

pub type HttpResult<T> = Result<T, HttpError>;

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<actix_web::error::BlockingError> for HttpError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        Self(ApiError::internal(e))
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

pub fn envelope(code: ErrorCode, message: &str) -> HttpResponse {
    envelope_retry(code, message, None)
}

/// The envelope, with `Retry-After` (seconds, default 1) on 429 and 503.
pub fn envelope_retry(code: ErrorCode, message: &str, retry_after: Option<u64>) -> HttpResponse {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = HttpResponse::build(status);
    if matches!(code, ErrorCode::RateLimited | ErrorCode::Backpressure) {
        res.insert_header((header::RETRY_AFTER, retry_after.unwrap_or(1).to_string()));
    }
    res.json(serde_json::json!({"error": message, "code": code.as_str(), "status": code.status()}))
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        envelope_retry(self.0.code, &self.0.message, self.0.retry_after)
    }
}

/// Errors of actix's JSON extractor: wrong content type, too large, malformed.
pub fn json_error(
    err: actix_web::error::JsonPayloadError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    let e = match &err {
        J::OverflowKnownLength { .. } | J::Overflow { .. } => {
            ApiError::new(ErrorCode::PayloadTooLarge, "request body exceeds 1 MiB")
        }
        J::ContentType => ApiError::invalid("content type must be application/json"),
        J::Deserialize(d) => ApiError::invalid(format!("invalid JSON body: {d}")),
        _ => ApiError::invalid("invalid JSON body"),
    };
    HttpError(e).into()
}

pub fn query_error(
    err: actix_web::error::QueryPayloadError,
    _: &actix_web::HttpRequest,
) -> actix_web::Error {
    HttpError(ApiError::invalid(format!("invalid query: {err}"))).into()
}

pub fn path_error(_: actix_web::error::PathError, _: &actix_web::HttpRequest) -> actix_web::Error {
    HttpError(ApiError::not_found("not found")).into()
}

pub async fn unknown_route() -> HttpResponse {
    envelope(ErrorCode::NotFound, "no such route")
}

/// Last line of defence: any error response that is not already our JSON envelope (a
/// framework default page, a 405, an extractor error) is rewritten into one.
pub fn ensure_envelope<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> ServiceResponse<BoxBody> {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/json"));
    if status.as_u16() < 400 || is_json || status == StatusCode::SWITCHING_PROTOCOLS {
        return res.map_into_boxed_body();
    }
    let (code, message) = match status.as_u16() {
        401 => (ErrorCode::AuthFailed, "authentication failed"),
        403 => (ErrorCode::Forbidden, "forbidden"),
        404 | 405 => (ErrorCode::NotFound, "no such route"),
        413 => (ErrorCode::PayloadTooLarge, "request body exceeds 1 MiB"),
        429 => (ErrorCode::RateLimited, "rate limited"),
        503 => (ErrorCode::Backpressure, "service unavailable"),
        s if s >= 500 => (ErrorCode::InternalError, "internal error"),
        _ => (ErrorCode::InvalidInput, "invalid request"),
    };
    let (req, _) = res.into_parts();
    let mut out = envelope(code, message);
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    ServiceResponse::new(req, out)
}
