//! Per-request context: classify, decide, and account for every ending.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::classify::{classify, Class};
use crate::config::Config;

use super::abi::{self, Headers};
use super::metrics::Metrics;

pub struct Http {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
}

impl Http {
    pub fn new(config: Rc<Config>, metrics: Rc<Metrics>) -> Self {
        Self { config, metrics }
    }
}

fn request_header(name: &str) -> Vec<u8> {
    abi::header(Headers::Request, name)
        .ok()
        .flatten()
        .unwrap_or_default()
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let method = request_header(":method");
        let path = request_header(":path");
        let request = classify(
            std::str::from_utf8(&method).unwrap_or(""),
            std::str::from_utf8(&path).unwrap_or(""),
            &self.config.base_uri,
        );
        let class = Class::of(request.op, false);
        self.metrics.requests[class.index()].inc();
        Action::Continue
    }
}
