//! The only code that talks to Envoy: contexts, shared data, metrics, calls.

mod abi;
mod http;
mod metrics;
mod root;
mod store;
mod worker;

use proxy_wasm::traits::RootContext;

proxy_wasm::main! {{
    std::panic::set_hook(Box::new(|info| {
        // panic = "abort": this line is all the operator will see before the VM dies.
        abi::log(abi::Level::Critical, &format!("sessionguard panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(root::Root::new(id)) });
}}
