//! The one error type of the domain. Every rule returns it; the HTTP layer renders it as
//! SPEC §8's envelope `{error, code, status}` in exactly one place.

use std::fmt;

/// Every error code of SPEC §8 with its HTTP status: the one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidInput,
    LimitExceeded,
    AuthFailed,
    Forbidden,
    NotAMember,
    CannotModifyMembers,
    MutableNotPermitted,
    NotFound,
    AppNotFound,
    Conflict,
    MessageImmutable,
    DirectChannelMembership,
    ResyncRequired,
    PayloadTooLarge,
    FeatureDisabled,
    RateLimited,
    InternalError,
    Backpressure,
}

impl ErrorCode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid_input",
            Self::LimitExceeded => "limit_exceeded",
            Self::AuthFailed => "auth_failed",
            Self::Forbidden => "forbidden",
            Self::NotAMember => "not_a_member",
            Self::CannotModifyMembers => "cannot_modify_members",
            Self::MutableNotPermitted => "mutable_not_permitted",
            Self::NotFound => "not_found",
            Self::AppNotFound => "app_not_found",
            Self::Conflict => "conflict",
            Self::MessageImmutable => "message_immutable",
            Self::DirectChannelMembership => "direct_channel_membership",
            Self::ResyncRequired => "resync_required",
            Self::PayloadTooLarge => "payload_too_large",
            Self::FeatureDisabled => "feature_disabled",
            Self::RateLimited => "rate_limited",
            Self::InternalError => "internal_error",
            Self::Backpressure => "backpressure",
        }
    }

    pub const fn status(self) -> u16 {
        match self {
            Self::InvalidInput | Self::LimitExceeded => 400,
            Self::AuthFailed => 401,
            Self::Forbidden
            | Self::NotAMember
            | Self::CannotModifyMembers
            | Self::MutableNotPermitted => 403,
            Self::NotFound | Self::AppNotFound => 404,
            Self::Conflict | Self::MessageImmutable | Self::DirectChannelMembership => 409,
            Self::ResyncRequired => 410,
            Self::PayloadTooLarge => 413,
            Self::FeatureDisabled => 422,
            Self::RateLimited => 429,
            Self::InternalError => 500,
            Self::Backpressure => 503,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds for `Retry-After` on 429 and 503 (1 when not set).
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidInput, message)
    }
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::LimitExceeded, message)
    }
    pub fn auth(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::AuthFailed, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn backpressure(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Backpressure, message)
    }
    /// An unexpected failure: the detail goes to the log, never to the client.
    pub fn internal(detail: impl fmt::Display) -> Self {
        log::error!("internal error: {detail}");
        Self::new(ErrorCode::InternalError, "internal error")
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

impl std::error::Error for ApiError {}

impl From<diesel::result::Error> for ApiError {
    fn from(e: diesel::result::Error) -> Self {
        match e {
            diesel::result::Error::NotFound => Self::not_found("not found"),
            other => Self::internal(other),
        }
    }
}

impl From<r2d2::Error> for ApiError {
    fn from(e: r2d2::Error) -> Self {
        log::error!("database pool: {e}");
        Self::backpressure("the store is unreachable")
    }
}

/// WebSocket close codes used by the realtime endpoint (`/api/realtime/ws`), in one table.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Blocked or deactivated member: policy violation.
    pub const POLICY: u16 = 1008;
    /// Inbound frame over the frame limit.
    pub const TOO_BIG: u16 = 1009;
    /// Outbound queue overflow: reconnect with the last cursor.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Cursor pruned, unknown, beyond the tail or over the replay budget.
    pub const RESYNC_REQUIRED: u16 = 4001;
    /// Server shutting down: reconnect (Pusher's 4200 meaning).
    pub const RECONNECT: u16 = 4200;

    /// The Pusher face (`/app/{key}`), with Pusher's and Sockudo's meanings: 4000–4099 do
    /// not reconnect, 4100–4199 reconnect with backoff, 4200–4299 reconnect at once. Codes
    /// below are sent in `pusher:error` frames; those marked "close" also close the socket.
    pub mod pusher {
        /// `pusher:error`: a frame that is not a protocol frame (non-JSON, binary).
        pub const INVALID_FRAME: u16 = 4000;
        /// Close: no workspace has this key.
        pub const APP_NOT_FOUND: u16 = 4001;
        /// Close at connect (origin, token) or on terminate; `pusher:error` for a refused
        /// subscription or sign-in.
        pub const UNAUTHORIZED: u16 = 4009;
        /// Close: the outbound queue overflowed (a slow client); a presence channel full.
        pub const OVER_CAPACITY: u16 = 4100;
        /// Close: server shutting down.
        pub const RECONNECT: u16 = 4200;
        /// Close: no pong within the pong timeout after a server ping.
        pub const PONG_TIMEOUT: u16 = 4201;
        /// `pusher:error`: a channel error (bad name, missing channel data, history denied).
        pub const CHANNEL_ERROR: u16 = 4300;
        /// `pusher:error`: a client event refused (disabled, wrong channel, too big, rate).
        pub const CLIENT_EVENT: u16 = 4301;
        /// `pusher:error`: `resume` without channel positions (Sockudo reuses 4302).
        pub const NO_POSITIONS: u16 = 4302;
    }
}
