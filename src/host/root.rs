//! Per-VM root context: configuration, metrics, periodic work.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::config::Config;

use super::abi::{self, Buffer, Level};
use super::http::Http;
use super::metrics::Metrics;

/// Largest plugin configuration accepted; anything bigger is a mistake.
const MAX_CONFIG_BYTES: usize = 1 << 20;

pub struct Root {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
}

impl Root {
    pub fn new() -> Self {
        Self {
            config: Rc::new(Config::default()),
            metrics: Rc::new(Metrics::default()),
        }
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match abi::buffer(Buffer::PluginConfiguration, MAX_CONFIG_BYTES) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                abi::log(
                    Level::Error,
                    &format!("cannot read plugin configuration (host status {})", status.0),
                );
                return false;
            }
        };
        match Config::parse(&bytes) {
            Ok(config) => {
                self.config = Rc::new(config);
                self.metrics = Rc::new(Metrics::define());
                abi::log(Level::Info, "configuration accepted");
                true
            }
            Err(err) => {
                abi::log(Level::Error, &err.to_string());
                false
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(self.config.clone(), self.metrics.clone())))
    }
}
