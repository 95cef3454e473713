//! What the HTTP targets (EMQX, webhook) share: the client, and how answers and failures are read.
//!
//! This module must never put a URL into an error or a log line (webhook URLs often carry a token),
//! hence `without_url` on every transport error.

use std::time::Duration;

use reqwest::StatusCode;

/// The HTTP client of the HTTP targets: rustls with the system's root certificates, no redirects
/// (a POST must not turn into a GET somewhere else), one timeout per request, connecting included.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("meshguard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// 5xx, 429 (rate limited) and 408 (the server timed out reading the request) may pass later;
/// any other 4xx, and 3xx, will not.
pub(crate) fn is_transient_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
}

/// The reason of a transport failure without its URL, with the causes reqwest's own message leaves
/// out ("error sending request" says little; "Connection refused" says what happened).
pub(crate) fn transport_reason(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut reason = if error.is_timeout() { String::from("timed out") } else { error.to_string() };
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        source = cause.source();
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_statuses_are_retried() {
        for code in [500, 502, 503, 504, 429, 408] {
            assert!(is_transient_status(StatusCode::from_u16(code).expect("status")), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 410, 422, 301, 302] {
            assert!(!is_transient_status(StatusCode::from_u16(code).expect("status")), "{code}");
        }
    }
}
