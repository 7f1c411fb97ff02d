//! The few C calls of librados and librbd guardblk uses, resolved with dlopen/dlsym the
//! first time an `rbd:` target is used (see the parent module for why not a binding crate).
//! Prototypes are those of librados.h and librbd.h in Ceph 16 (each call is older).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use super::RbdError;

pub(super) type RadosT = *mut c_void;
pub(super) type IoctxT = *mut c_void;
pub(super) type ImageT = *mut c_void;
/// librbd's `rbd_completion_t`.
pub(super) type CompletionT = *mut c_void;
/// librbd's `rbd_callback_t`: called once when an asynchronous operation finishes, on one
/// of librbd's threads.
pub(super) type CallbackT = unsafe extern "C" fn(CompletionT, *mut c_void);

/// The C calls used, resolved once from the two libraries.
pub(super) struct Api {
    pub(super) rados_create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    pub(super) rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    pub(super) rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    pub(super) rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    pub(super) rados_shutdown: unsafe extern "C" fn(RadosT),
    pub(super) rados_ioctx_create:
        unsafe extern "C" fn(RadosT, *const c_char, *mut IoctxT) -> c_int,
    pub(super) rados_ioctx_destroy: unsafe extern "C" fn(IoctxT),
    pub(super) rbd_open:
        unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    pub(super) rbd_open_read_only:
        unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    pub(super) rbd_close: unsafe extern "C" fn(ImageT) -> c_int,
    pub(super) rbd_create: unsafe extern "C" fn(IoctxT, *const c_char, u64, *mut c_int) -> c_int,
    pub(super) rbd_remove: unsafe extern "C" fn(IoctxT, *const c_char) -> c_int,
    pub(super) rbd_get_id: unsafe extern "C" fn(ImageT, *mut c_char, usize) -> c_int,
    /// The mode argument is `rbd_lock_mode_t`, an int-sized C enum.
    pub(super) rbd_lock_acquire: unsafe extern "C" fn(ImageT, c_int) -> c_int,
    /// image, snapshot to diff from, offset, length, include_parent, whole_object, callback
    /// (offset, length, exists, arg), arg.
    pub(super) rbd_diff_iterate2: unsafe extern "C" fn(
        ImageT,
        *const c_char,
        u64,
        u64,
        u8,
        u8,
        unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int,
        *mut c_void,
    ) -> c_int,
    /// image, exclusive, then (buffer, length) for the tag, clients, cookies and addresses.
    #[allow(clippy::type_complexity)]
    pub(super) rbd_list_lockers: unsafe extern "C" fn(
        ImageT,
        *mut c_int,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
    ) -> isize,
    pub(super) rbd_get_size: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    pub(super) rbd_read2: unsafe extern "C" fn(ImageT, u64, usize, *mut c_char, c_int) -> isize,
    pub(super) rbd_write2: unsafe extern "C" fn(ImageT, u64, usize, *const c_char, c_int) -> isize,
    pub(super) rbd_flush: unsafe extern "C" fn(ImageT) -> c_int,
    pub(super) rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, CallbackT, *mut CompletionT) -> c_int,
    pub(super) rbd_aio_get_return_value: unsafe extern "C" fn(CompletionT) -> isize,
    pub(super) rbd_aio_release: unsafe extern "C" fn(CompletionT),
    pub(super) rbd_aio_readv:
        unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    pub(super) rbd_aio_writev:
        unsafe extern "C" fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int,
    pub(super) rbd_aio_flush: unsafe extern "C" fn(ImageT, CompletionT) -> c_int,
    pub(super) rbd_aio_write_zeroes:
        unsafe extern "C" fn(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int,
}

/// Open `name` with dlopen, keeping it loaded for the life of the process.
fn open_library(name: &'static str) -> Result<*mut c_void, RbdError> {
    let c_name = CString::new(name).expect("library names have no NUL");
    // SAFETY: dlopen with a valid C string; the handle is never closed, so symbols resolved
    // from it stay valid for the process's lifetime.
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(RbdError::NoLibrary {
            library: name,
            reason: dl_error(),
        });
    }
    Ok(handle)
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a valid C string owned by libdl, read at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: non-null, NUL-terminated, as above.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Resolve `symbol` in `handle` as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the `unsafe extern "C" fn` type that matches the symbol's C declaration.
unsafe fn symbol<F: Copy>(
    handle: *mut c_void,
    library: &'static str,
    symbol: &str,
) -> Result<F, RbdError> {
    let c_symbol = CString::new(symbol).expect("symbol names have no NUL");
    // SAFETY: a valid handle from dlopen and a valid C string.
    let p = unsafe { libc::dlsym(handle, c_symbol.as_ptr()) };
    if p.is_null() {
        return Err(RbdError::NoLibrary {
            library,
            reason: format!("it has no {symbol}"),
        });
    }
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: p is the address of the function the caller vouched `F` describes; function
    // pointers and data pointers have the same size and representation on Linux.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

pub(super) fn api() -> Result<&'static Api, RbdError> {
    static API: OnceLock<Result<Api, (&'static str, String)>> = OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .map_err(|(library, reason)| RbdError::NoLibrary {
            library,
            reason: reason.clone(),
        })
}

/// The API, or which library failed and why.
fn load() -> Result<Api, (&'static str, String)> {
    load_api().map_err(|e| match e {
        RbdError::NoLibrary { library, reason } => (library, reason),
        other => ("librbd.so.1", other.to_string()),
    })
}

fn load_api() -> Result<Api, RbdError> {
    const RADOS: &str = "librados.so.2";
    const RBD: &str = "librbd.so.1";
    let rados = open_library(RADOS)?;
    let rbd = open_library(RBD)?;
    // SAFETY: each type below is the C prototype of its symbol in librados.h / librbd.h
    // (Ceph 16, and unchanged since the calls were introduced).
    unsafe {
        Ok(Api {
            rados_create: symbol(rados, RADOS, "rados_create")?,
            rados_conf_read_file: symbol(rados, RADOS, "rados_conf_read_file")?,
            rados_conf_set: symbol(rados, RADOS, "rados_conf_set")?,
            rados_connect: symbol(rados, RADOS, "rados_connect")?,
            rados_shutdown: symbol(rados, RADOS, "rados_shutdown")?,
            rados_ioctx_create: symbol(rados, RADOS, "rados_ioctx_create")?,
            rados_ioctx_destroy: symbol(rados, RADOS, "rados_ioctx_destroy")?,
            rbd_open: symbol(rbd, RBD, "rbd_open")?,
            rbd_open_read_only: symbol(rbd, RBD, "rbd_open_read_only")?,
            rbd_close: symbol(rbd, RBD, "rbd_close")?,
            rbd_create: symbol(rbd, RBD, "rbd_create")?,
            rbd_remove: symbol(rbd, RBD, "rbd_remove")?,
            rbd_get_id: symbol(rbd, RBD, "rbd_get_id")?,
            rbd_lock_acquire: symbol(rbd, RBD, "rbd_lock_acquire")?,
            rbd_list_lockers: symbol(rbd, RBD, "rbd_list_lockers")?,
            rbd_diff_iterate2: symbol(rbd, RBD, "rbd_diff_iterate2")?,
            rbd_get_size: symbol(rbd, RBD, "rbd_get_size")?,
            rbd_read2: symbol(rbd, RBD, "rbd_read2")?,
            rbd_write2: symbol(rbd, RBD, "rbd_write2")?,
            rbd_flush: symbol(rbd, RBD, "rbd_flush")?,
            rbd_aio_create_completion: symbol(rbd, RBD, "rbd_aio_create_completion")?,
            rbd_aio_get_return_value: symbol(rbd, RBD, "rbd_aio_get_return_value")?,
            rbd_aio_release: symbol(rbd, RBD, "rbd_aio_release")?,
            rbd_aio_readv: symbol(rbd, RBD, "rbd_aio_readv")?,
            rbd_aio_writev: symbol(rbd, RBD, "rbd_aio_writev")?,
            rbd_aio_flush: symbol(rbd, RBD, "rbd_aio_flush")?,
            rbd_aio_write_zeroes: symbol(rbd, RBD, "rbd_aio_write_zeroes")?,
        })
    }
}
