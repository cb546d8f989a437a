//! The proxy-wasm calls sessionguard makes, without panics.
//!
//! The SDK's `hostcalls::*` wrappers `panic!` on any status they do not expect, and a
//! panic aborts the VM of that Envoy worker. A filter that guards against overload must
//! not add a way to fail, so the calls on our paths go straight to the ABI here and
//! every status comes back as a value. Memory the host hands us is allocated through
//! the SDK's exported allocator, so taking ownership with `Vec::from_raw_parts` is
//! what the SDK itself does.

// The only module that calls the host through raw pointers (the crate denies unsafe code).
#![allow(unsafe_code)]

use std::ptr::null_mut;

/// A non-OK status from the host (the ABI's `WasmResult` code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatus(pub u32);

pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const CAS_MISMATCH: u32 = 8;

/// `proxy_log` levels.
#[derive(Debug, Clone, Copy)]
pub enum Level {
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// Header maps we read.
#[derive(Debug, Clone, Copy)]
pub enum Headers {
    Request = 0,
    Response = 2,
    CallResponse = 6,
}

#[derive(Debug, Clone, Copy)]
pub enum Buffer {
    CallResponseBody = 4,
    PluginConfiguration = 7,
}

#[derive(Debug, Clone, Copy)]
pub enum MetricKind {
    Counter = 0,
    Gauge = 1,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

fn status(code: u32) -> Result<(), HostStatus> {
    if code == OK {
        Ok(())
    } else {
        Err(HostStatus(code))
    }
}

/// Takes ownership of a host-allocated buffer (null means "no value").
///
/// # Safety
/// `data` must be null or come from the host through the SDK allocator with `size` bytes.
unsafe fn owned(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        None
    } else {
        Some(Vec::from_raw_parts(data, size, size))
    }
}

pub fn log(level: Level, message: &str) {
    // Nothing useful can be done if logging itself fails.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Host wall-clock time in nanoseconds since the epoch (0 if the host refuses).
pub fn now_ns() -> u64 {
    let mut nanos: u64 = 0;
    let code = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    if code == OK {
        nanos
    } else {
        0
    }
}

pub fn set_tick_period_ms(ms: u32) -> Result<(), HostStatus> {
    status(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

pub fn buffer(kind: Buffer, max: usize) -> Result<Option<Vec<u8>>, HostStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let code = unsafe { proxy_get_buffer_bytes(kind as u32, 0, max, &mut data, &mut size) };
    match code {
        OK => Ok(unsafe { owned(data, size) }),
        NOT_FOUND => Ok(None),
        other => Err(HostStatus(other)),
    }
}

/// One header's raw value; `Ok(None)` when absent.
pub fn header(map: Headers, name: &str) -> Result<Option<Vec<u8>>, HostStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let code = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match code {
        OK => Ok(unsafe { owned(data, size) }),
        NOT_FOUND => Ok(None),
        other => Err(HostStatus(other)),
    }
}

/// A whole header map, serialized (read it with [`crate::header_pairs::find`]).
pub fn header_pairs(map: Headers) -> Result<Option<Vec<u8>>, HostStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let code = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    match code {
        OK => Ok(unsafe { owned(data, size) }),
        NOT_FOUND => Ok(None),
        other => Err(HostStatus(other)),
    }
}

/// Shared data value and CAS token; `Ok(None)` when the key was never written.
pub fn shared_get(key: &str) -> Result<Option<(Vec<u8>, u32)>, HostStatus> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    let code =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match code {
        OK => Ok(unsafe { owned(data, size) }.map(|v| (v, cas))),
        NOT_FOUND => Ok(None),
        other => Err(HostStatus(other)),
    }
}

/// `cas == 0` writes unconditionally.
pub fn shared_set(key: &str, value: &[u8], cas: u32) -> Result<(), HostStatus> {
    status(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// Sends a local reply; `details` shows in Envoy's access log `%RESPONSE_CODE_DETAILS%`.
pub fn send_local_response(
    code: u32,
    details: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Result<(), HostStatus> {
    let map = crate::header_pairs::serialize(headers);
    status(unsafe {
        proxy_send_local_response(
            code,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    })
}

pub fn define_metric(kind: MetricKind, name: &str) -> Result<u32, HostStatus> {
    let mut id: u32 = 0;
    status(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, offset: i64) -> Result<(), HostStatus> {
    status(unsafe { proxy_increment_metric(id, offset) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), HostStatus> {
    status(unsafe { proxy_record_metric(id, value) })
}

/// Makes the following calls act on another context of this VM (e.g. a paused request).
pub fn set_effective_context(context_id: u32) -> Result<(), HostStatus> {
    status(unsafe { proxy_set_effective_context(context_id) })
}

/// Resumes the current context's paused request.
pub fn resume_request() -> Result<(), HostStatus> {
    status(unsafe { proxy_continue_stream(0) })
}

/// Starts an HTTP call to an Envoy cluster; the answer arrives in `on_http_call_response`.
///
/// This one call goes through the SDK: its dispatcher must record the token to route
/// the answer back to the calling context, and panics on an answer it did not record.
/// The SDK wrapper itself panics only on statuses Envoy does not return for this call
/// (it returns Ok, BadArgument or InternalFailure).
pub fn http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    timeout_ms: u32,
) -> Result<u32, HostStatus> {
    proxy_wasm::hostcalls::dispatch_http_call(
        cluster,
        headers,
        None,
        Vec::new(),
        std::time::Duration::from_millis(u64::from(timeout_ms)),
    )
    .map_err(|status| HostStatus(status as u32))
}
