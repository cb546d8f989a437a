//! How a request ended ([`Ending`]) and what the host knows then ([`Completion`]): the
//! outcome every mechanism learns from (the limiter, its gradient, admission control).

use crate::gradient::Lane;

/// How a request ended, as the host saw it in `on_log` (or on drop of the context).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The upstream answered with this status.
    Response(u32),
    /// The upstream did not answer in time (route or per-try timeout).
    UpstreamTimeout,
    /// The upstream connection failed or was reset before a complete response.
    UpstreamReset,
    /// The client went away first: says nothing about the upstream.
    DownstreamReset,
    /// Answered at the proxy (shed, negative-cache hit): the upstream was not asked.
    LocalReply,
    /// The upstream answered, but its status was not read: a read of a key known to
    /// exist that was not timed needs none (see `crate::clock`); the timed ones stand
    /// for it in admission control.
    Unread,
}

impl Ending {
    /// Whether the upstream succeeded, for admission control: `Some(true)` for any
    /// status below 500 (a 404 is the store working), `Some(false)` for 5xx, resets and
    /// timeouts, `None` when the upstream's health is not what ended the request.
    pub fn upstream_success(self) -> Option<bool> {
        match self {
            Ending::Response(status) => Some(status < 500),
            Ending::UpstreamTimeout | Ending::UpstreamReset => Some(false),
            Ending::DownstreamReset | Ending::LocalReply | Ending::Unread => None,
        }
    }

    /// Whether the request's duration measures the upstream's latency: real answers
    /// and timeouts do; fast failures, resets and local replies would drag the RTT
    /// down and the limit up, so they do not.
    pub fn is_latency_sample(self) -> bool {
        match self {
            Ending::Response(status) => status < 500 || status == 504,
            Ending::UpstreamTimeout => true,
            Ending::UpstreamReset
            | Ending::DownstreamReset
            | Ending::LocalReply
            | Ending::Unread => false,
        }
    }
}

/// What the host knows when a request ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    /// Time from admission to the end of the upstream response, in ms, if known.
    /// NaN, infinite and negative values are ignored.
    pub rtt_ms: Option<f64>,
    pub ending: Ending,
    /// Whose latency the RTT is: reads and writes are judged apart.
    pub lane: Lane,
}
