//! The processor's allocator: mimalloc, and how soon it hands freed memory back to the OS.
//!
//! This is the only crate of the workspace allowed unsafe code, for one FFI call: mimalloc's
//! options are set through its C API (or environment variables read when the process starts),
//! and the `mimalloc` crate exposes neither.

pub use mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h`). `libmimalloc-sys` names no constant for
/// it; mimalloc keeps option numbers stable (retired options keep their place as `deprecated_*`),
/// and a test checks that this number reads the purge delay's default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory may stay resident before mimalloc returns it to the OS, in ms.
pub const PURGE_DELAY_MS: i64 = 100;

/// Has mimalloc return freed memory to the OS after [`PURGE_DELAY_MS`] instead of its default
/// second. The processor frees about as fast as it allocates (per 50 KB event its payload, texts,
/// documents and records), and kept up to a second's worth of freed pages resident. Its peak RSS
/// in the 50 KB drain (`bench/latest.md`, session 16, medians of 3 runs): 106 MB with the default,
/// 86 MB with 100 ms, 82 MB with 10 ms; with the changelog on 164, 149 and 149 MB. At 10 ms the
/// purges and the page faults after them cost about 0.2 ms of CPU per 50 KB event more (1.01
/// against 0.78 ms); at 100 ms none measurable (0.82). The delay is checked when a thread next
/// allocates or frees, so a busy service purges on time. `MIMALLOC_PURGE_DELAY` in the
/// environment still takes precedence.
pub fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` only stores a value in mimalloc's option table (an atomic store);
    // the option number is in range (see the test) and any delay value is valid.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
    }
}

/// The purge delay mimalloc uses now, in ms.
pub fn purge_delay_ms() -> i64 {
    // SAFETY: `mi_option_get` reads mimalloc's option table; the option number is in range.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is the purge delay's: before it is set it reads mimalloc 3's default
    /// (1000 ms, which no other option has), after it the value set. Fails when mimalloc moves
    /// the option or changes its default: then look again at what this tunes.
    #[test]
    fn the_option_set_is_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        assert_eq!(purge_delay_ms(), 1000, "mimalloc's default purge delay");
        return_freed_memory_promptly();
        assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
    }
}
