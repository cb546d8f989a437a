//! The cheapest possible proxy-wasm HTTP filter: every callback continues at once.
//! Benchmarks measure sessionguard against it, so the cost of the ABI itself
//! (V8, context creation, callbacks) is not charged to sessionguard.

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::ContextType;

    struct Root;
    struct Http;

    impl Context for Root {}
    impl Context for Http {}
    impl HttpContext for Http {}

    impl RootContext for Root {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Http))
        }
    }

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}
}
